"""Search-R1 data: the parquet schema, the prompt templates, raw QA readers.

The converter (`convert`, `merge` and the CLI) lives in `searchr1_jax.data.convert`, which
this package does not import, so that `python -m searchr1_jax.data.convert` runs cleanly.
"""
from searchr1_jax.data.flashrag import QARecord, read_flashrag_jsonl
from searchr1_jax.data.prompts import (
    SEARCH_R1_INSTRUCTION, TEMPLATES, base_prompt, chat_messages, encode_prompt, has_chat_template,
    render_prompt, resolve_template,
)
from searchr1_jax.data.schema import (
    COLUMNS, DEFAULT_ABILITY, PARQUET_SCHEMA, Example, read_examples, write_examples,
)

__all__ = [
    "COLUMNS",
    "DEFAULT_ABILITY",
    "Example",
    "PARQUET_SCHEMA",
    "QARecord",
    "SEARCH_R1_INSTRUCTION",
    "TEMPLATES",
    "base_prompt",
    "chat_messages",
    "encode_prompt",
    "has_chat_template",
    "read_examples",
    "read_flashrag_jsonl",
    "render_prompt",
    "resolve_template",
    "write_examples",
]
