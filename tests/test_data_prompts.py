"""The Search-R1 instruction text and prompt rendering."""
import pytest

from searchr1_jax.data import (
    SEARCH_R1_INSTRUCTION, base_prompt, chat_messages, encode_prompt, has_chat_template, render_prompt, resolve_template,
)

# Transcribed from the reference, word for word.
EXPECTED_HAMLET = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every "
    "time you get new information. After reasoning, if you find you lack some knowledge, you can "
    "call a search engine by <search> query </search> and it will return the top searched results "
    "between <information> and </information>. You can search as many times as your want. If you "
    "find no further external knowledge needed, you can directly provide the answer inside <answer> "
    "and </answer>, without detailed illustrations. For example, <answer> Beijing </answer>. "
    "Question: who wrote hamlet?\n"
)


def test_base_prompt_matches_the_reference_text():
    assert base_prompt("who wrote hamlet") == EXPECTED_HAMLET
    assert SEARCH_R1_INSTRUCTION.format(question="who wrote hamlet?") == EXPECTED_HAMLET


def test_base_prompt_appends_one_question_mark_and_strips():
    assert base_prompt("  who wrote hamlet?  ") == EXPECTED_HAMLET
    assert base_prompt("where is {x}").endswith("Question: where is {x}?\n")  # braces kept literally


def test_base_prompt_rejects_an_empty_question():
    with pytest.raises(ValueError, match="question is empty"):
        base_prompt("   ")


def test_chat_messages_and_base_rendering():
    messages = chat_messages("who wrote hamlet")
    assert messages == [{"role": "user", "content": EXPECTED_HAMLET}]
    assert render_prompt(messages, "base") == EXPECTED_HAMLET


class _TemplateStub:
    """Records what render_prompt asks of a tokenizer (the real one is tested in test_data_convert)."""

    chat_template = "stub"
    name_or_path = "stub"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return f"{messages[0]['role']}|{messages[0]['content']}|gen={add_generation_prompt}|tok={tokenize}"


def test_chat_rendering_opens_the_assistant_turn_without_tokenizing():
    assert render_prompt([{"role": "user", "content": "q"}], "chat", _TemplateStub()) == "user|q|gen=True|tok=False"


def test_render_prompt_errors():
    messages = chat_messages("q")
    with pytest.raises(ValueError, match="template 'chat' needs a tokenizer"):
        render_prompt(messages, "chat")
    no_template = _TemplateStub()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="tokenizer 'stub' has no chat_template"):
        render_prompt(messages, "chat", no_template)
    with pytest.raises(ValueError, match="unknown prompt template 'plain'; valid: auto, base, chat"):
        render_prompt(messages, "plain")
    with pytest.raises(ValueError, match=r"exactly one message, a user message; got roles \['system', 'user'\]"):
        render_prompt([{"role": "system", "content": "s"}] + messages, "base")


# --- the original's rule: the chat template whenever the tokenizer has one -------------------

# Qwen2.5's behaviour for a plain user turn: a default system turn, the user turn, the
# assistant turn opened (written here from the documented output, not copied).
QWEN_LIKE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{%- if m['role'] != 'system' %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN_RENDERED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    + EXPECTED_HAMLET + "<|im_end|>\n<|im_start|>assistant\n"
)


def make_tokenizer(chat_template):
    """A real transformers fast tokenizer (byte-level BPE, BOS added to raw text), with or
    without a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "<|im_start|>": 1, "<|im_end|>": 2, **{c: i + 3 for i, c in enumerate(sorted(alphabet))}}
    backend = Tokenizer(models.BPE(vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def chat_tokenizer():
    return make_tokenizer(QWEN_LIKE_TEMPLATE)


@pytest.fixture(scope="module")
def plain_tokenizer():
    return make_tokenizer(None)


def test_auto_renders_the_chat_template_when_the_tokenizer_has_one(chat_tokenizer):
    messages = chat_messages("who wrote hamlet")
    assert resolve_template("auto", chat_tokenizer) == "chat"
    assert render_prompt(messages, "auto", chat_tokenizer) == QWEN_RENDERED
    ids = encode_prompt(messages, "auto", chat_tokenizer)
    assert chat_tokenizer.decode(ids) == QWEN_RENDERED
    assert ids[0] == 1 and 0 not in ids  # starts at <|im_start|>; no BOS added on top of the template
    assert ids == encode_prompt(messages, "chat", chat_tokenizer)


def test_auto_is_the_raw_text_without_a_chat_template(plain_tokenizer):
    messages = chat_messages("who wrote hamlet")
    assert resolve_template("auto", plain_tokenizer) == "base"
    assert resolve_template("auto", None) == "base"
    assert render_prompt(messages, "auto", plain_tokenizer) == EXPECTED_HAMLET
    ids = encode_prompt(messages, "auto", plain_tokenizer)
    assert ids[0] == 0 and plain_tokenizer.decode(ids[1:]) == EXPECTED_HAMLET  # raw text gets the BOS


def test_explicit_overrides(chat_tokenizer, plain_tokenizer):
    messages = chat_messages("who wrote hamlet")
    assert render_prompt(messages, "base", chat_tokenizer) == EXPECTED_HAMLET
    assert encode_prompt(messages, "base", chat_tokenizer) == encode_prompt(messages, "auto", plain_tokenizer)
    with pytest.raises(ValueError, match="has no chat_template; use template 'base'"):
        encode_prompt(messages, "chat", plain_tokenizer)


def test_every_entry_point_follows_the_rule(chat_tokenizer, plain_tokenizer):
    """evaluate/trainer (encode_prompts), sft (tokenize_trajectory), the config default and the
    CLIs' defaults all resolve "auto" through encode_prompt."""
    import argparse

    from searchr1_jax.config import base_config
    from searchr1_jax.data.schema import Example
    from searchr1_jax.evaluate import add_rollout_flags, encode_prompts
    from searchr1_jax.sft import tokenize_trajectory

    assert base_config().data.template == "auto"
    parser = argparse.ArgumentParser()
    add_rollout_flags(parser)  # evaluate's and infer's flags
    assert parser.parse_args(["--index", "indexes/x"]).template == "auto"
    example = Example(data_source="nq", prompt=chat_messages("who wrote hamlet"), golden_answers=["Shakespeare"],
                      split="test", index=0)
    for tokenizer in (chat_tokenizer, plain_tokenizer):
        expected = encode_prompt(example.prompt, "auto", tokenizer)
        assert encode_prompts([example], tokenizer, "auto", 10_000) == [(example, expected)]
        ids, mask = tokenize_trajectory({"prompt": EXPECTED_HAMLET, "segments": [{"kind": "policy", "text": "x"}]}, tokenizer)
        assert ids[:len(expected)] == expected and mask[:len(expected)] == [0] * len(expected)
    assert chat_tokenizer.decode(encode_prompts([example], chat_tokenizer, "auto", 10_000)[0][1]) == QWEN_RENDERED


def test_the_demo_tokenizer_has_no_chat_template_so_its_prompts_stay_raw(tmp_path):
    """The CPU demo trains its own tokenizer: "auto" must give exactly its former "base" prompts."""
    from searchr1_jax.demo.tokenizer import save_hf_tokenizer, train_tokenizer
    from searchr1_jax.models import load_tokenizer

    save_hf_tokenizer(train_tokenizer([EXPECTED_HAMLET]), tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    messages = chat_messages("who wrote hamlet")
    assert not has_chat_template(tokenizer)
    assert encode_prompt(messages, "auto", tokenizer) == tokenizer(EXPECTED_HAMLET, add_special_tokens=True)["input_ids"]
