"""Search-R1 in JAX: reinforcement learning that teaches an LLM to reason and search."""

__version__ = "0.1.0"
