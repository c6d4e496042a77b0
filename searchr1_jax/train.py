"""Entry point: python -m searchr1_jax.train --config=configs/X.py [--config.a.b=value ...]

With a config whose `demo` section is enabled (configs/tiny_demo.py), runs the whole CPU
demo pipeline (world, warm start, RL, evaluation, export); otherwise trains on the given
model, data and retriever. A mistake in the flags, the config or the inputs ends the run
with one line, `error: …`, naming the field or file (exit 1); a run stopped by its NaN guard
(`config.trainer.max_bad_steps` non-finite steps in a row) exits 2.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from searchr1_jax.cli import quiet_logs, user_errors
from searchr1_jax.config import validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["config"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an override of an unknown field (which ml_collections raises
    as a multi-line AttributeError deep inside the parser) reported as one line."""
    for arg in argv[1:]:
        if arg.startswith("--config=") and not os.path.isfile(arg.split("=", 1)[1].split(":", 1)[0]):
            raise SystemExit(f"error: --config: no such config file {arg.split('=', 1)[1]!r}")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise SystemExit(f"error: {e}") from None
    except (AttributeError, KeyError) as e:
        while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(msg))
            e = e.args[0]
        lines = str(e.args[0] if e.args else e).splitlines() or [""]
        key = lines[0].strip("'\" ")
        flag = next((a.split("=", 1)[0] for a in argv[1:]
                     if a.startswith("--config.") and a.split("=", 1)[0].endswith("." + key)), "--config." + key)
        hint = " ".join(" ".join(lines[1:]).split())
        raise SystemExit(f"error: {flag}: unknown config field" + (f"; {hint}" if hint else "")) from None


def main(argv):
    del argv
    quiet_logs()
    from searchr1_jax.parallel import distributed

    distributed.initialize()
    config = _CONFIG.value
    with user_errors():
        validate(config)
    if config.trainer.compilation_cache_dir:
        import jax

        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.trainer.compilation_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if config.demo.enabled:
        from searchr1_jax.demo.pipeline import run_demo

        run_demo(config)
        return
    from searchr1_jax.trainer import Trainer, TrainingDiverged

    with user_errors():
        trainer = Trainer(config)
    try:
        trainer.train()
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, argv=sys.argv, flags_parser=parse_flags)
