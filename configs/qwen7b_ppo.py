"""Search-R1 PPO on Qwen2.5-7B (base), the published recipe; FSDP 4 × tensor 2 on 8 GPUs
(the memory estimate: 51.6 GiB/device on 8×H100-80GB; pure FSDP needs 68 GiB).

  python -m searchr1_jax.train --config=configs/qwen7b_ppo.py --config.model.path=/models/Qwen2.5-7B
"""
from searchr1_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "qwen7b_ppo"
    c.model.path = "models/Qwen2.5-7B"
    c.data.train_files = "data/nq_hotpotqa/train.parquet"
    c.data.val_files = "data/nq_hotpotqa/test.parquet"
    c.retriever.url = "http://127.0.0.1:8000/retrieve"
    c.algorithm.name = "ppo"
    c.trainer.micro_batch_size = 16
    c.mesh.preset = "fsdp_tensor"
    c.mesh.fsdp = 4
    c.mesh.tensor = 2
    return c
