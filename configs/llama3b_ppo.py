"""Search-R1 PPO on Llama-3.2-3B (base), the Qwen2.5-3B PPO recipe otherwise.

  python -m searchr1_jax.train --config=configs/llama3b_ppo.py --config.model.path=/models/Llama-3.2-3B
"""
from searchr1_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "llama3b_ppo"
    c.model.path = "models/Llama-3.2-3B"
    c.data.train_files = "data/nq_hotpotqa/train.parquet"
    c.data.val_files = "data/nq_hotpotqa/test.parquet"
    c.retriever.url = "http://127.0.0.1:8000/retrieve"
    c.algorithm.name = "ppo"
    c.trainer.micro_batch_size = 32
    c.mesh.preset = "fsdp"
    return c
