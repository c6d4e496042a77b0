"""Format validity, the format-aware reward (each branch) and R1-Searcher's two stages."""
import pytest

from searchr1_jax.rewards import (
    count_searches, format_reward, gold_in_information, is_valid_format, r1_searcher_stage1,
    r1_searcher_stage2,
)

INFO_PARIS = "\n\n<information>Doc 1(Title: Paris) Paris is the capital of France.</information>\n\n"
INFO_OTHER = "\n\n<information>Doc 1(Title: Lyon) Lyon is a city in France.</information>\n\n"


def searched(info: str, answer: str) -> str:
    return (f"<think>I need to look it up.</think>\n<search> capital of france </search>{info}"
            f"<think>Now I know.</think>\n<answer> {answer} </answer>")


@pytest.mark.parametrize("response", [
    "<think>easy</think><answer>Paris</answer>",
    "\n <think>\neasy\n</think>\n\n<answer>\nParis\n</answer>\n",
    searched(INFO_PARIS, "Paris"),
    # two search rounds
    "<think>a</think><search>q1</search>" + INFO_OTHER + "<think>b</think><search>q2</search>"
    + INFO_PARIS + "<think>c</think><answer>Paris</answer>",
    # the prompt template opened the first <think>
    "I should search.</think>\n<answer>Paris</answer>",
    # retrieved text is opaque, even when it holds tags
    "<think>a</think><search>q</search><information><think><answer>x</answer></information>"
    "<think>b</think><answer>Paris</answer>",
    "<think></think><answer></answer>",  # structure only: empty blocks are allowed
])
def test_valid_format(response):
    assert is_valid_format(response)


@pytest.mark.parametrize("response", [
    "",
    "Paris",
    "<answer>Paris</answer>",  # no think
    "<think>a</think>",  # no answer
    "<think>a</think><answer>Paris</answer> and more",  # text after the answer
    "<think>a</think> so <answer>Paris</answer>",  # text between blocks
    "preamble <think>a</think><answer>Paris</answer>",  # text before the first block
    "<think>a<answer>Paris</answer>",  # unbalanced think
    "<think>a</think><answer>Paris",  # unclosed answer
    "<think>a</think><think>b</think><answer>Paris</answer>",  # two thinks in a row
    "<think>a</think><answer>London</answer><answer>Paris</answer>",  # two answers
    "<think>I will <search>q</search></think><answer>Paris</answer>",  # nested tag
    "<think>a</think><search>q</search><think>b</think><answer>Paris</answer>",  # no information
    "<think>a</think><search>q</search>" + INFO_PARIS + "<answer>Paris</answer>",  # no think after
    "<think>a</think><search>q</search>" + INFO_PARIS,  # ends on information
    "<think>a</think><search>q</search><information>d</information> x <search>q</search>"
    "<information>d</information><think>b</think><answer>Paris</answer>",  # junk between rounds
    "<think>a</think><search>q</search><information>unclosed<think>b</think><answer>P</answer>",
    "<THINK>a</THINK><ANSWER>Paris</ANSWER>",  # tags are lower-case
])
def test_invalid_format(response):
    assert not is_valid_format(response)


def test_count_searches_ignores_information():
    response = "<search>a</search><information><search>fake</search></information><search>b</search>"
    assert count_searches(response) == 2
    assert count_searches("<think>a</think><answer>x</answer>") == 0


def test_gold_in_information_needs_whole_words():
    assert gold_in_information(searched(INFO_PARIS, "x"), ["the capital"])  # normalised
    assert not gold_in_information(searched(INFO_OTHER, "x"), ["Paris"])
    assert not gold_in_information("<information>It started</information>", ["art"])
    assert not gold_in_information("Paris outside any block", ["Paris"])


# One test per branch of the paper-2 reward (lambda_f = lambda_s = 0.2 unless given).
def test_format_reward_correct_and_valid():
    assert format_reward(searched(INFO_PARIS, "Paris"), ["paris"]) == 1.0


def test_format_reward_correct_but_invalid():
    response = "<answer>Paris</answer>"  # no think
    assert format_reward(response, ["Paris"]) == pytest.approx(0.8)
    assert format_reward(response, ["Paris"], lambda_f=0.5) == pytest.approx(0.5)
    # two answer tags: the last is scored, but the format is invalid
    assert format_reward("<think>a</think><answer>Rome</answer><answer>Paris</answer>",
                         ["Paris"]) == pytest.approx(0.8)


def test_format_reward_wrong_but_valid():
    assert format_reward(searched(INFO_OTHER, "Lyon"), ["Paris"]) == pytest.approx(0.2)
    assert format_reward(searched(INFO_OTHER, "Lyon"), ["Paris"], lambda_s=0.3) == pytest.approx(0.3)
    # an empty answer is no answer, but the format is valid
    assert format_reward("<think>a</think><answer></answer>", ["Paris"]) == pytest.approx(0.2)


def test_format_reward_wrong_but_valid_with_retrieval_bonus():
    response = searched(INFO_PARIS, "Lyon")  # the gold answer was retrieved, then ignored
    assert format_reward(response, ["Paris"]) == pytest.approx(0.2)  # the published bonus is 0
    assert format_reward(response, ["Paris"], retrieval_bonus=0.1) == pytest.approx(0.3)
    assert format_reward(searched(INFO_OTHER, "Lyon"), ["Paris"], retrieval_bonus=0.1) == pytest.approx(0.2)


def test_format_reward_wrong_and_invalid():
    assert format_reward("<answer>Lyon</answer>", ["Paris"]) == pytest.approx(0.1)
    assert format_reward("<answer>Lyon</answer>", ["Paris"], wrong_invalid_score=0.05) == pytest.approx(0.05)


def test_format_reward_nothing():
    assert format_reward("I think it is Paris.", ["Paris"]) == 0.0
    # the answer appears only in retrieved text: no answer, invalid format, no bonus
    no_answer = "<think>a</think><search>q</search>" + INFO_PARIS
    assert format_reward(no_answer, ["Paris"], retrieval_bonus=0.1) == 0.0


def test_format_reward_refuses_missing_golds():
    with pytest.raises(ValueError, match="no usable gold answer"):
        format_reward(searched(INFO_PARIS, "Paris"), [])


@pytest.mark.parametrize("response, expected", [
    (searched(INFO_PARIS, "Lyon"), 1.0),  # valid and searched; the answer does not matter
    ("<think>a</think><answer>Paris</answer>", 0.5),  # valid, no search
    ("<search>q</search><answer>Paris</answer>", 0.5),  # searched, invalid
    ("<answer>Paris</answer>", 0.0),
    ("<information><search>q</search></information><answer>x</answer>", 0.0),  # not the model's search
])
def test_r1_searcher_stage1(response, expected):
    assert r1_searcher_stage1(response, ["Paris"]) == expected


@pytest.mark.parametrize("response, expected", [
    (searched(INFO_PARIS, "Paris"), 1.0),
    (searched(INFO_PARIS, "Paris Texas"), 2 / 3),  # F1: P = 1/2, R = 1
    (searched(INFO_PARIS, "Lyon"), 0.0),
    ("<answer>Paris</answer>", 1.0 - 2.0),  # correct but invalid format
    ("nothing", -2.0),
])
def test_r1_searcher_stage2(response, expected):
    assert r1_searcher_stage2(response, ["Paris"]) == pytest.approx(expected)
