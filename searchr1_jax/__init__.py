"""Search-R1 in JAX: reinforcement learning that teaches an LLM to reason and search."""
import os

# transformers prints "PyTorch was not found…" on import when torch is absent, which it is in a
# plain install: this package uses transformers only for tokenizers and configs.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
