"""The CPU demo trained with PPO instead of GRPO: a critic (GAE advantages), KL in the reward.

  python -m searchr1_jax.train --config=configs/tiny_demo_ppo.py

Same world, warm start (cached with configs/tiny_demo.py's) and evaluation as
configs/tiny_demo.py; one sample per question, so each step rolls out 40 questions, the
same 40 trajectories per step as GRPO's 8 questions × 5 samples.
"""
from pathlib import Path

from searchr1_jax.config import config_from_file


def get_config():
    c = config_from_file(Path(__file__).with_name("tiny_demo.py"))
    c.name = "tiny_demo_ppo"
    c.algorithm.name = "ppo"
    c.algorithm.kl_in_reward = True
    c.algorithm.kl_loss = False
    c.rollout.n_samples = 1
    c.optim.actor_lr = 2e-4  # the lr this variant was measured with; the GRPO demo uses 1.5e-4
    c.trainer.batch_size = 40
    c.trainer.mini_batch_size = 40
    return c
