"""Choosing the reward function per data_source from an ml_collections config."""
import pickle

import ml_collections
import pytest

from searchr1_jax.rewards import REWARD_NAMES, default_reward_config, make_reward_fn

VALID_WRONG = "<think>hm</think><answer>Lyon</answer>"
INVALID_CORRECT = "<answer>Paris</answer>"
VALID_PARTIAL = "<think>hm</think><answer>Paris Texas</answer>"


def test_default_is_exact_match_on_the_last_answer():
    reward = make_reward_fn(default_reward_config())
    assert reward(INVALID_CORRECT, ["paris"], "nq") == 1.0
    assert reward(VALID_WRONG, ["Paris"], "nq") == 0.0
    assert reward("no answer", ["Paris"], "nq") == 0.0


def test_per_source_overrides_the_default_name():
    cfg = default_reward_config()
    cfg.name = "format"
    cfg.per_source = {"hotpotqa": "f1", "popqa": "subem"}
    reward = make_reward_fn(cfg)
    assert reward(VALID_WRONG, ["Paris"], "nq") == pytest.approx(0.2)  # format: wrong but valid
    assert reward(VALID_PARTIAL, ["Paris"], "hotpotqa") == pytest.approx(2 / 3)
    assert reward(VALID_PARTIAL, ["Paris"], "popqa") == 1.0
    assert reward(VALID_PARTIAL, ["Paris"], "unknown_source") == pytest.approx(0.2)


def test_format_lambdas_come_from_the_config():
    cfg = default_reward_config()
    cfg.name = "format"
    cfg.lambda_f, cfg.lambda_s, cfg.wrong_invalid_score = 0.5, 0.3, 0.05
    reward = make_reward_fn(cfg)
    assert reward(INVALID_CORRECT, ["Paris"], "nq") == pytest.approx(0.5)
    assert reward(VALID_WRONG, ["Paris"], "nq") == pytest.approx(0.3)
    assert reward("<answer>Lyon</answer>", ["Paris"], "nq") == pytest.approx(0.05)
    cfg.retrieval_bonus = 0.4
    retrieved = ("<think>a</think><search>q</search><information>Paris</information>"
                 "<think>b</think><answer>Lyon</answer>")
    assert make_reward_fn(cfg)(retrieved, ["Paris"], "nq") == pytest.approx(0.7)


@pytest.mark.parametrize("name, expected", [
    ("em", 0.0), ("subem", 1.0), ("f1", 2 / 3), ("format", 0.2), ("r1_stage1", 0.5), ("r1_stage2", 2 / 3),
])
def test_every_name_selects_its_function(name, expected):
    cfg = default_reward_config()
    cfg.name = name
    assert make_reward_fn(cfg)(VALID_PARTIAL, ["Paris"], "nq") == pytest.approx(expected)
    assert name in REWARD_NAMES


def test_unknown_names_list_the_valid_ones():
    cfg = default_reward_config()
    cfg.name = "bleu"
    with pytest.raises(ValueError, match=r"field name: unknown reward 'bleu'; valid: em, subem, f1, format"):
        make_reward_fn(cfg)
    cfg = default_reward_config()
    cfg.per_source = {"nq": "exact"}
    with pytest.raises(ValueError, match=r"per_source\['nq'\]: unknown reward 'exact'; valid: em"):
        make_reward_fn(cfg)


def test_bad_config_fields_are_named():
    cfg = default_reward_config()
    cfg.lamda_f = 0.3  # typo
    with pytest.raises(ValueError, match=r"unknown reward config field\(s\) \['lamda_f'\]"):
        make_reward_fn(cfg)
    cfg = ml_collections.ConfigDict({"name": "format", "lambda_s": "0.2"})  # e.g. from a config file
    with pytest.raises(ValueError, match="'lambda_s' must be a finite number, got '0.2'"):
        make_reward_fn(cfg)
    cfg = default_reward_config()
    cfg.retrieval_bonus = float("nan")
    with pytest.raises(ValueError, match="'retrieval_bonus' must be a finite number"):
        make_reward_fn(cfg)


def test_partial_config_takes_defaults_and_the_function_pickles():
    reward = make_reward_fn(ml_collections.ConfigDict({"name": "format"}))
    assert reward(INVALID_CORRECT, ["Paris"], "nq") == pytest.approx(0.8)
    restored = pickle.loads(pickle.dumps(reward))  # for process pools
    assert restored(INVALID_CORRECT, ["Paris"], "nq") == pytest.approx(0.8)
