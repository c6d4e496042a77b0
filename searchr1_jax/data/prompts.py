"""The Search-R1 instruction and how it becomes the text a model is given.

The stored prompt of an example is a chat message list with one user turn holding
`base_prompt(question)` (the Search-R1 parquet layout). `render_prompt` turns it into the
model's input text and `encode_prompt` into its token ids, by one rule everywhere (train,
evaluate, infer, sft), the original's: template "auto" (the default) applies the
tokenizer's chat template with the assistant turn opened whenever the tokenizer has one
(Qwen2.5 *base* tokenizers do), and gives the user content as is otherwise; "chat" and
"base" force one or the other.
"""
from __future__ import annotations

from typing import Sequence

# Kept word for word (including "as your want"): models trained by Search-R1 saw this text.
SEARCH_R1_INSTRUCTION = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, "
    "you can call a search engine by <search> query </search> and it will return the top "
    "searched results between <information> and </information>. You can search as many times "
    "as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>. Question: {question}\n"
)

TEMPLATES = ("auto", "base", "chat")


def base_prompt(question: str) -> str:
    """The instruction with the stripped question filled in, `?` appended when missing."""
    question = question.strip()
    if not question:
        raise ValueError("question is empty")
    if not question.endswith("?"):
        question += "?"
    return SEARCH_R1_INSTRUCTION.format(question=question)


def chat_messages(question: str) -> list[dict[str, str]]:
    """The stored prompt: one user message holding `base_prompt(question)`."""
    return [{"role": "user", "content": base_prompt(question)}]


def has_chat_template(tokenizer) -> bool:
    """Whether `tokenizer` (a transformers tokenizer, or None) carries a chat template."""
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def resolve_template(template: str, tokenizer=None) -> str:
    """"base" or "chat": what `template` means for `tokenizer`.

    "auto" is "chat" when the tokenizer has a chat template and "base" otherwise (the
    original's rule); "base" and "chat" are explicit overrides.
    """
    if template == "auto":
        return "chat" if has_chat_template(tokenizer) else "base"
    if template in ("base", "chat"):
        return template
    raise ValueError(f"unknown prompt template {template!r}; valid: {', '.join(TEMPLATES)}")


def render_prompt(messages: Sequence[dict[str, str]], template: str, tokenizer=None) -> str:
    """The text the model is given for a stored prompt.

    template "base": the content of the (single) user message, unchanged.
    template "chat": `tokenizer.apply_chat_template(messages, add_generation_prompt=True,
    tokenize=False)`; `tokenizer` (a transformers tokenizer with a chat template) is required.
    template "auto": "chat" if `tokenizer` has a chat template, else "base".
    """
    template = resolve_template(template, tokenizer)
    if template == "base":
        user = [m["content"] for m in messages if m.get("role") == "user"]
        if len(user) != 1 or len(messages) != 1:
            raise ValueError(
                f"template 'base' needs exactly one message, a user message; got roles "
                f"{[m.get('role') for m in messages]}"
            )
        return user[0]
    if tokenizer is None:
        raise ValueError("template 'chat' needs a tokenizer (one with a chat_template)")
    if not has_chat_template(tokenizer):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no "
            "chat_template; use template 'base' (or 'auto') for it"
        )
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def encode_prompt(messages: Sequence[dict[str, str]], template: str, tokenizer) -> list[int]:
    """Token ids of the rendered prompt (see `render_prompt`), the one path every caller uses.

    Raw text gets the tokenizer's special tokens (e.g. Llama's BOS); a chat-rendered prompt
    already carries them from the template, so none are added to it.
    """
    resolved = resolve_template(template, tokenizer)
    text = render_prompt(messages, resolved, tokenizer)
    return list(tokenizer(text, add_special_tokens=resolved == "base")["input_ids"])
