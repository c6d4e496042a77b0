"""Entry point: python -m searchr1_jax.train --config=configs/X.py [--config.a.b=value ...]

With a config whose `demo` section is enabled (configs/tiny_demo.py), runs the whole CPU
demo pipeline (world, warm start, RL, evaluation, export); otherwise trains on the given
model, data and retriever.
"""
from __future__ import annotations

import logging
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from searchr1_jax.config import ConfigError, validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    # Our progress at INFO; libraries (Orbax writes a dozen lines per save) at WARNING.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("searchr1_jax").setLevel(logging.INFO)
    from searchr1_jax.parallel import distributed

    distributed.initialize()
    config = _CONFIG.value
    try:
        validate(config)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if config.trainer.compilation_cache_dir:
        import jax

        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.trainer.compilation_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if config.demo.enabled:
        from searchr1_jax.demo.pipeline import run_demo

        run_demo(config)
        return
    from searchr1_jax.trainer import Trainer

    try:
        trainer = Trainer(config)
    except (ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    trainer.train()


if __name__ == "__main__":
    app.run(main)
