"""Observation text: byte-for-byte the format Search-R1 puts in the policy's context."""
from searchr1_jax.retrieval.observation import format_passages, wrap_information
from searchr1_jax.retrieval.types import Passage


def test_format_passages_matches_search_r1():
    passages = [
        Passage("1", "Paris", "Paris is the capital of France.", 3.2),
        Passage("2", "Seine", "A river.\nIt flows through Paris.", 1.0),
        Passage("3", "", "untitled", 0.5),
    ]
    # The original splits each wiki-18 `contents` ('"Title"\ntext') at its first newline and
    # writes f"Doc {i}(Title: {first line}) {rest}\n", so the title keeps its quotes.
    assert format_passages(passages) == (
        'Doc 1(Title: "Paris") Paris is the capital of France.\n'
        'Doc 2(Title: "Seine") A river.\nIt flows through Paris.\n'
        'Doc 3(Title: "") untitled\n'
    )
    assert format_passages([]) == ""


def test_wrap_information_strips_and_wraps():
    text = format_passages([Passage("1", "T", "body")])
    assert wrap_information(text) == '\n\n<information>Doc 1(Title: "T") body</information>\n\n'
    assert wrap_information("") == "\n\n<information></information>\n\n"
