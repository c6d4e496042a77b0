"""The Search-R1 instruction text and prompt rendering."""
import pytest

from searchr1_jax.data import SEARCH_R1_INSTRUCTION, base_prompt, chat_messages, render_prompt

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
    with pytest.raises(ValueError, match="unknown prompt template 'plain'; valid: base, chat"):
        render_prompt(messages, "plain")
    with pytest.raises(ValueError, match=r"exactly one message, a user message; got roles \['system', 'user'\]"):
        render_prompt([{"role": "system", "content": "s"}] + messages, "base")
