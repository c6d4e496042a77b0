"""Normalisation, answer extraction and EM/subEM/F1 against hand-written cases."""
import pytest

from searchr1_jax.rewards import exact_match, extract_answer, f1, normalize_answer, sub_exact_match


@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  An   apple,\ta day.\n", "apple day"),
    ("Theatre of the Absurd", "theatre of absurd"),  # articles only as whole words
    ("New-York", "newyork"),  # punctuation removed without a space, as published
    ("$5 + 3 = 8", "5 3 8"),  # ASCII symbols of string.punctuation go too
    ("“Paris”", "paris"),  # typographic quotes are punctuation
    ("ＰＡＲＩＳ", "paris"),  # full-width letters fold under NFKC
    ("北京。", "北京"),  # non-Latin text kept, ideographic full stop dropped
    ("Beyoncé", "beyoncé"),  # accents are kept
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_normalize_answer_unifies_composed_and_decomposed_accents():
    composed, decomposed = "Beyonc\u00e9", "Beyonce\u0301"
    assert composed != decomposed
    assert normalize_answer(composed) == normalize_answer(decomposed)
    assert normalize_answer("Beyonce") != normalize_answer(composed)


def test_normalize_answer_rejects_non_text():
    with pytest.raises(TypeError, match="expects str, got NoneType"):
        normalize_answer(None)


@pytest.mark.parametrize("response, expected", [
    ("no tags at all, Paris", None),
    ("<think>x</think><answer> Paris </answer>", "Paris"),
    ("<answer>London</answer> wait <answer>Paris</answer>", "Paris"),  # the last one counts
    ("<answer>Paris</answer> then <answer>Lond", "Paris"),  # an unclosed tag is not an answer
    # The original's rule: non-greedy pairs left to right, the last complete pair wins.
    ("<think>x</think><answer> Paris </answer>\n</answer>", "Paris"),  # a stray closing tag changes nothing
    ("<answer>Rome</answer><answer> Paris </answer>\n</answer>\n</answer>", "Paris"),
    ("<answer>a <answer>b</answer>", "a <answer>b"),  # the first opening starts the pair
    ("<answer>Paris</answer> <answer>Lond</answer", "Paris"),  # an incomplete closing tag is no pair
    ("<answer></answer>", ""),
    ("<answer>\nNew\nYork\n</answer>", "New\nYork"),
    ("</answer> Paris <answer>", None),
    # Retrieved text never provides the answer, even when it holds answer tags.
    ("<search>q</search>\n<information>Doc 1(Title: X) <answer>Paris</answer></information>", None),
    ("<information><answer>Paris</answer></information><answer>Rome</answer>", "Rome"),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_answer_only_inside_information_scores_zero():
    response = ("<think>t</think><search>capital of france</search>\n\n<information>Doc 1(Title: Paris) "
                "Paris is the capital of France.</information>\n\n<think>not sure</think>")
    pred = extract_answer(response)
    assert pred is None
    assert exact_match(pred, ["Paris"]) == sub_exact_match(pred, ["Paris"]) == f1(pred, ["Paris"]) == 0.0


@pytest.mark.parametrize("pred, golds, expected", [
    ("the Paris!", ["paris"], 1.0),
    ("Paris, France", ["paris"], 0.0),
    ("NYC", ["New York City", "NYC"], 1.0),  # any of several golds
    ("new york", ["New York City", "NYC"], 0.0),
    ("“Beyoncé”", ["Beyonce\u0301"], 1.0),
    ("北京", ["北京。"], 1.0),
    ("Paris", "Paris", 1.0),  # a single str is one gold answer, not a list of characters
    ("p", "Paris", 0.0),
    (None, ["Paris"], 0.0),
    ("", ["the", "Paris"], 0.0),  # "the" normalises to "" and is ignored, not matched
])
def test_exact_match(pred, golds, expected):
    assert exact_match(pred, golds) == expected


@pytest.mark.parametrize("pred, golds, expected", [
    ("It is Paris, France.", ["Paris"], 1.0),
    ("Par", ["Paris"], 0.0),
    ("The answer is NYC", ["New York City", "nyc"], 1.0),
    ("start", ["art"], 1.0),  # character substring, as published
    ("anything", ["the", "Rome"], 0.0),  # an empty-after-normalisation gold matches nothing
    (None, ["Paris"], 0.0),
])
def test_sub_exact_match(pred, golds, expected):
    assert sub_exact_match(pred, golds) == expected


@pytest.mark.parametrize("pred, golds, expected", [
    # tokens [big, red, apple] vs [red, apple, pie]: overlap 2, P = R = 2/3
    ("the big red apple", ["red apple pie"], 2 / 3),
    # overlap 1: P = 1/3, R = 1 -> 2·(1/3)/(4/3) = 1/2; a repeated token counts once
    ("paris paris london", ["Paris"], 0.5),
    # max over golds: 2/3 for the first, 1.0 for the second
    ("red apple", ["red apple pie", "Red Apple!"], 1.0),
    ("rome", ["paris"], 0.0),
    ("the", ["paris"], 0.0),  # empty prediction after normalisation
    (None, ["paris"], 0.0),
])
def test_f1(pred, golds, expected):
    assert f1(pred, golds) == pytest.approx(expected)


@pytest.mark.parametrize("metric", [exact_match, sub_exact_match, f1])
def test_metrics_refuse_golds_that_cannot_score(metric):
    with pytest.raises(ValueError, match="no usable gold answer"):
        metric("Paris", [])
    with pytest.raises(ValueError, match="no usable gold answer"):
        metric("Paris", ["The", " ?! "])
    with pytest.raises(TypeError, match="gold answers must be str, got int"):
        metric("1984", [1984])
