"""The smallest real training run, for the trainer's CLI tests. Paths come as overrides:
--config.model.path, --config.data.train_files, --config.data.val_files,
--config.retriever.index_dir, --config.trainer.output_dir."""
from searchr1_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "tiny_cli"
    c.model.compute_dtype = "float32"
    c.model.remat = False
    c.rollout.max_turns = 1
    c.rollout.max_new_tokens = 12
    c.rollout.max_obs_tokens = 40
    c.rollout.max_prompt_tokens = 64
    c.rollout.max_context_tokens = 144
    c.rollout.n_samples = 2
    c.algorithm.name = "grpo"
    c.algorithm.kl_in_reward = False
    c.algorithm.kl_loss = True
    c.optim.actor_lr = 1e-3
    c.optim.actor_warmup_ratio = 0.0
    c.optim.critic_lr = 1e-3
    c.optim.critic_warmup_ratio = 0.0
    c.trainer.total_steps = 3
    c.trainer.batch_size = 4
    c.trainer.mini_batch_size = 4
    c.trainer.micro_batch_size = 2
    c.trainer.eval_every = 0
    c.trainer.save_every = 1
    c.trainer.samples_to_log = 2
    c.mesh.fsdp = -1
    return c
