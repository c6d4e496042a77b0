"""Search-R1 GRPO on Qwen2.5-3B (base): groups of 5 samples per prompt, KL as a k3 loss term.

  python -m searchr1_jax.train --config=configs/qwen3b_grpo.py --config.model.path=/models/Qwen2.5-3B
"""
from searchr1_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "qwen3b_grpo"
    c.model.path = "models/Qwen2.5-3B"
    c.data.train_files = "data/nq_hotpotqa/train.parquet"
    c.data.val_files = "data/nq_hotpotqa/test.parquet"
    c.retriever.url = "http://127.0.0.1:8000/retrieve"
    c.algorithm.name = "grpo"
    c.algorithm.kl_in_reward = False
    c.algorithm.kl_loss = True
    c.algorithm.kl_estimator = "k3"
    c.algorithm.kl_coef = 0.001
    c.rollout.n_samples = 5
    c.trainer.micro_batch_size = 32
    c.mesh.preset = "fsdp"
    return c
