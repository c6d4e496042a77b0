"""Search-R1 PPO on Qwen2.5-3B (base): the published recipe (the base config's defaults).

Paths are config fields; override them on the command line:
  python -m searchr1_jax.train --config=configs/qwen3b_ppo.py \
      --config.model.path=/models/Qwen2.5-3B \
      --config.data.train_files=data/nq_hotpotqa/train.parquet \
      --config.data.val_files=data/nq_hotpotqa/test.parquet \
      --config.retriever.url=http://127.0.0.1:8000/retrieve
"""
from searchr1_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "qwen3b_ppo"
    c.model.path = "models/Qwen2.5-3B"
    c.data.train_files = "data/nq_hotpotqa/train.parquet"
    c.data.val_files = "data/nq_hotpotqa/test.parquet"
    c.retriever.url = "http://127.0.0.1:8000/retrieve"
    c.algorithm.name = "ppo"
    c.trainer.micro_batch_size = 32
    c.mesh.preset = "fsdp"
    return c
