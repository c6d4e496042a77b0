"""What a new user has on disk before the README's "Training on real models" steps, made
tiny: a random Qwen2 model saved by transformers with its tokenizer (which, like Qwen2.5's,
carries a chat template) in `models/Qwen2.5-3B`, FlashRAG-style jsonl splits for two
sources, and a corpus `wiki-18.jsonl`; questions and passages come from the small demo
world so that searches find something."""
from __future__ import annotations

import json
from pathlib import Path

from searchr1_jax.data import read_examples
from searchr1_jax.data.prompts import base_prompt
from searchr1_jax.demo import tokenizer as demo_tokenizer
from searchr1_jax.demo.build import build_demo

SOURCES = {"demo_single_hop": "nq", "demo_two_hop": "hotpotqa"}
CHAT_MARKERS = ("<|im_start|>", "<|im_end|>")
# The shape of Qwen2.5's template: a default system turn, then each message, then an opened
# assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _write_flashrag(parquet: Path, root: Path, split: str) -> list[str]:
    """One `{id, question, golden_answers}` jsonl per source, named like FlashRAG's files;
    returns the questions."""
    lines: dict[str, list[str]] = {name: [] for name in SOURCES.values()}
    questions = []
    for i, ex in enumerate(read_examples(parquet)):
        lines[SOURCES[ex.data_source]].append(json.dumps(
            {"id": f"{split}_{i}", "question": ex.question, "golden_answers": list(ex.golden_answers)}))
        questions.append(ex.question)
    for name, rows in lines.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return questions


def _save_tokenizer(texts: list[str], out: Path):
    """A word-level tokenizer of `texts` with the chat markers as special tokens."""
    import transformers
    from tokenizers import AddedToken

    trained = demo_tokenizer.train_tokenizer(texts, split_names=False)
    trained.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_MARKERS])
    demo_tokenizer.save_hf_tokenizer(trained, out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))
    return transformers.PreTrainedTokenizerFast.from_pretrained(out)


def make_user_files(root: Path, model_dir: str = "models/Qwen2.5-3B") -> Path:
    """Fill `root` (the user's working directory) and return it."""
    import torch
    import transformers

    paths = build_demo(root / ".demo_cache", size="small", seed=0, instruction="short")
    questions = _write_flashrag(paths.train, root, "train") + _write_flashrag(paths.test, root, "test")
    (root / "wiki-18.jsonl").write_bytes(paths.corpus.read_bytes())
    texts = [json.loads(line)["contents"] for line in paths.corpus.read_text().splitlines()]
    texts += [base_prompt(q) for q in questions] + ["system\nYou are a helpful assistant.\nuser\nassistant\n"]
    tokenizer = _save_tokenizer(texts, root / model_dir)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(root / model_dir)
    return root
