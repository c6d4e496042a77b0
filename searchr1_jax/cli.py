"""What every command-line entry point shares: library logs kept quiet, and a user's mistake
reported as one line (`error: …` naming the field, flag or file) instead of a traceback.

A "user's mistake" is an error of a type raised only for bad input: a config value, a
missing file, a corpus or parquet that cannot be read, an unreachable retriever, a model
that does not fit the devices. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import logging


def user_error_types() -> tuple[type[BaseException], ...]:
    from searchr1_jax.config import ConfigError
    from searchr1_jax.parallel.memory import MemoryBudgetError
    from searchr1_jax.retrieval.client import RetrieverError
    from searchr1_jax.retrieval.corpus import CorpusError

    return ConfigError, FileNotFoundError, MemoryBudgetError, RetrieverError, CorpusError


@contextlib.contextmanager
def user_errors():
    """Turn a user's mistake raised inside the block into `SystemExit("error: …")` (exit 1)."""
    try:
        yield
    except user_error_types() as e:
        raise SystemExit(f"error: {e}") from None


def quiet_logs(level: int = logging.INFO) -> None:
    """Our progress at `level`; JAX's backend probing, Orbax's per-save lines (absl) and
    other libraries at WARNING."""
    from absl import logging as absl_logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("searchr1_jax").setLevel(level)
