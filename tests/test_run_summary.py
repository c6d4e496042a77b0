"""The closing summary of a run, and the start-up line that says what the algorithm does."""
import logging
from pathlib import Path

from searchr1_jax.config import base_config
from searchr1_jax.run_summary import format_summary, summarize, validation_scores
from searchr1_jax.trainer import describe_algorithm

ROWS = [
    {"step": 1, "rollout/reward": 0.1},
    {"step": 2, "eval/nq/em": 0.25, "eval/hotpotqa/em": 0.10, "eval/all/em": 0.2, "eval/nq/f1": 0.9},
    {"step": 3, "rollout/reward": 0.3},
    {"step": 4, "eval/nq/em": 0.20, "eval/hotpotqa/em": 0.30, "eval/all/em": 0.22},
]


def test_validation_scores_keep_last_and_best_per_source():
    assert validation_scores(ROWS) == {
        "nq": {"last": 0.20, "last_step": 4, "best": 0.25, "best_step": 2},
        "hotpotqa": {"last": 0.30, "last_step": 4, "best": 0.30, "best_step": 4},
        "all": {"last": 0.22, "last_step": 4, "best": 0.22, "best_step": 4},
    }
    assert validation_scores(ROWS, "f1") == {"nq": {"last": 0.9, "last_step": 2, "best": 0.9, "best_step": 2}}
    assert validation_scores([{"step": 1, "eval/nq/em": None}]) == {}  # a NaN logged as null


def test_summary_names_the_checkpoints_and_the_export_command():
    summary = summarize(Path("runs/x"), ROWS, [4, 2], total_steps=4, step=4, stopped_early=False, seconds=61.2)
    assert summary["checkpoints"] == ["runs/x/checkpoints/2", "runs/x/checkpoints/4"]
    assert summary["export_command"] == "python -m searchr1_jax.export --checkpoint runs/x --out exports/x"
    text = format_summary(summary)
    assert text.splitlines()[0] == "run finished at step 4 of 4 (61 s): runs/x"
    assert "  nq        0.200 (4)   0.250 (2)" in text
    assert text.index("hotpotqa") < text.index("nq ") < text.index("all ")  # "all" last
    assert text.splitlines()[-1] == ("export the policy: python -m searchr1_jax.export --checkpoint runs/x "
                                     "--out exports/x")
    early = format_summary(summarize(Path("runs/x"), [], [], total_steps=4, step=1, stopped_early=True,
                                     seconds=1))
    assert "stopped early (resume with --config.trainer.resume=True) at step 1 of 4" in early
    assert "validation: none run" in early and "checkpoints: none" in early


def test_algorithm_line_says_where_the_kl_goes(caplog):
    c = base_config()
    with caplog.at_level(logging.INFO, logger="searchr1_jax"):
        assert describe_algorithm(c) == ("algorithm ppo: advantages: gae; critic: trained from the base model; "
                                         "KL to the reference: in the reward (k1, coef 0.001, fixed)")
    assert "WARNING" not in caplog.text
    # GRPO switched on from the PPO recipe keeps the KL in the reward: said, with the fix.
    c.algorithm.name, c.rollout.n_samples = "grpo", 5
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="searchr1_jax"):
        line = describe_algorithm(c)
    assert line.startswith("algorithm grpo: advantages: grpo over groups of 5 samples; critic: none; "
                           "KL to the reference: in the reward")
    assert "Search-R1's GRPO puts it in the loss" in caplog.text
    c.algorithm.kl_in_reward, c.algorithm.kl_loss = False, True
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="searchr1_jax"):
        assert describe_algorithm(c).endswith("KL to the reference: a loss term (k3, coef 0.001)")
    assert "WARNING" not in caplog.text
    c.algorithm.kl_coef = 0.0
    assert describe_algorithm(c).endswith("KL to the reference: none")
