"""The embedded default: the whole Search-R1 pipeline on a synthetic world, on a CPU.

`run_demo(config)` (what `python -m searchr1_jax.train --config=configs/tiny_demo.py` runs):
  1. build (or reuse) the world: corpus, BM25 index, parquet splits, tokenizer, behaviour
     trajectories (`demo.build`);
  2. warm-start a tiny Qwen2 model by SFT: clean episodes, then the noisy behaviour policy
     (see `warm_start`; cached by its settings);
  3. evaluate the warm start on the held-out questions (greedy);
  4. train with the real trainer (GRPO by default), evaluating as it goes;
  5. write the learning curve (PNG), `summary.json` and a before/after table, export the
     policy to Hugging Face format, and print one `infer` episode.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import ml_collections

log = logging.getLogger("searchr1_jax.demo")

QUESTION_TYPES = {"single_hop": "demo_single_hop", "two_hop": "demo_two_hop"}


def warm_start(paths, config: ml_collections.ConfigDict) -> Path:
    """The SFT'd model directory for this world and these settings (trained once, cached).

    Two stages, each cached under a key of its settings:
      1. `demo.sft_steps` on the copied worlds' episodes (world ≥ 1 in sft.jsonl, relabeled or
         renamed): played well, with facts or names that differ from world to world, they teach
         the task itself (search the question's entity, copy the answer out of the passage, two
         hops when needed);
      2. `demo.sft_noisy_steps` on the noisy behaviour policy's episodes on the demo's own train
         questions (world 0): the bad habits (answering without searching, stopping after one
         hop of two) of a mediocre starting model, which RL then has to unlearn.
    """
    d = config.demo
    base = {"seed": config.seed, "batch": d.sft_batch_size, "data": paths.root.name,
            "model": json.loads(Path(paths.model_config).read_text())}
    clean_settings = {**base, "steps": d.sft_steps, "lr": d.sft_lr}
    clean = _sft_stage(paths, config, "warm_start-clean", clean_settings, None, False, d.sft_steps, d.sft_lr)
    noisy_settings = {**clean_settings, "noisy_steps": d.sft_noisy_steps, "noisy_lr": d.sft_noisy_lr}
    return _sft_stage(paths, config, "warm_start", noisy_settings, clean, True, d.sft_noisy_steps, d.sft_noisy_lr)


def _sft_stage(paths, config, name: str, settings: dict, start: Path | None, noisy: bool, steps: int,
               lr: float) -> Path:
    """Train `steps` SFT steps from `start` (None: random init) on the episodes of world 0
    (`noisy`) or of the copied worlds; cached by `settings`, so a cached stage reads nothing."""
    from flax import nnx

    from searchr1_jax.models import Decoder, load_hf, load_tokenizer, save_hf
    from searchr1_jax.models.config import config_from_hf_dict
    from searchr1_jax.sft import read_trajectories, run_sft

    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(paths.root) / f"{name}-{key}"
    if (out / "config.json").is_file():
        log.info("%s: reusing %s", name, out)
        return out
    if start is None:
        cfg = config_from_hf_dict(settings["model"])
        model = Decoder(cfg, rngs=nnx.Rngs(config.seed))
    else:
        model, cfg = load_hf(start)
    tokenizer = load_tokenizer(paths.tokenizer)
    t0 = time.perf_counter()
    if steps:
        rows = [r for r in read_trajectories(paths.sft) if (r["world"] == 0) == noisy]
        losses = run_sft(model, tokenizer, rows, steps=steps, lr=lr, batch_size=config.demo.sft_batch_size,
                         max_len=config.rollout.max_context_tokens, seed=config.seed)
        log.info("%s: %d steps on %d episodes, loss %.3f → %.3f in %.0f s", name, steps, len(rows), losses[0],
                 losses[-1], time.perf_counter() - t0)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_hf(model, cfg, staging, tokenizer_dir=paths.tokenizer)
    staging.rename(out)
    return out


def em_by_type(table: dict) -> dict:
    """{"all": em, "single_hop": em, "two_hop": em} from an evaluation table."""
    out = {"all": table["all"]["em"]}
    for name, source in QUESTION_TYPES.items():
        if source in table:
            out[name] = table[source]["em"]
    return out


def summary_of(warm: dict, trained: dict, warm_table: dict, trained_table: dict, seconds: float) -> dict:
    summary = {"warm_start_em": warm["all"], "trained_em": trained["all"], "wall_seconds": round(seconds, 1)}
    for name in QUESTION_TYPES:
        if name in warm:
            summary[name] = {"warm_start_em": warm[name], "trained_em": trained[name]}
    summary["searches_per_question"] = {"warm_start": warm_table["all"]["searches"],
                                        "trained": trained_table["all"]["searches"]}
    return summary


def plot_curve(metrics_path: Path, out_png: Path) -> None:
    """Reward, held-out EM (per question type) and searches per question against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from searchr1_jax.metrics_log import read_metrics

    rows = read_metrics(metrics_path)
    train_rows = [r for r in rows if "rollout/reward" in r]  # step 0 holds only the warm-start eval
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [r["step"] for r in train_rows]
    axes[0].plot(steps, [r["rollout/reward"] for r in train_rows], label="train reward")
    axes[0].set_title("training reward")
    for name, source in [("all", "all"), *QUESTION_TYPES.items()]:
        points = [(r["step"], r[f"eval/{source}/em"]) for r in rows if f"eval/{source}/em" in r]
        if points:
            axes[1].plot(*zip(*points), marker="o", label=name)
    axes[1].set_title("held-out EM")
    axes[1].set_ylim(0, 1)
    axes[1].legend()
    axes[2].plot(steps, [r["rollout/searches"] for r in train_rows], label="train")
    points = [(r["step"], r["eval/all/searches"]) for r in rows if "eval/all/searches" in r]
    if points:
        axes[2].plot(*zip(*points), marker="o", label="held-out")
    axes[2].set_title("searches per question")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def summary_table(summary: dict) -> str:
    lines = ["| questions | warm start EM | trained EM |", "|---|---|---|"]
    for name in ("single_hop", "two_hop"):
        if name in summary:
            lines.append(f"| {name.replace('_', '-')} | {summary[name]['warm_start_em']:.3f} | "
                         f"{summary[name]['trained_em']:.3f} |")
    lines.append(f"| all | {summary['warm_start_em']:.3f} | {summary['trained_em']:.3f} |")
    return "\n".join(lines)


def run_demo(config: ml_collections.ConfigDict) -> dict:
    """Run the demo end to end; returns the summary (also written as summary.json)."""
    from searchr1_jax.demo.build import build_demo
    from searchr1_jax.evaluate import score_trajectory
    from searchr1_jax.infer import episode_segments, render_episode
    from searchr1_jax.models import save_hf
    from searchr1_jax.trainer import Trainer, output_dir_of

    t0 = time.perf_counter()
    d = config.demo
    paths = build_demo(d.cache_dir, size=d.size, seed=config.seed, instruction=d.instruction)
    warm_dir = warm_start(paths, config)
    run_config = ml_collections.ConfigDict(config.to_dict())
    run_config.model.path = str(warm_dir)
    run_config.model.tokenizer_path = str(paths.tokenizer)
    run_config.data.train_files = str(paths.train)
    run_config.data.val_files = str(paths.test)
    run_config.retriever.index_dir = str(paths.index)
    out_dir = output_dir_of(run_config)
    if out_dir.exists() and not config.trainer.resume:
        shutil.rmtree(out_dir)  # a fresh demo run each time, unless asked to resume

    trainer = Trainer(run_config)
    warm_metrics = trainer.evaluate(prefix="warm_start")
    warm_table = json.loads((out_dir / "samples" / "warm_start_step0_table.json").read_text())
    print("\nwarm start (held-out, greedy):", {k: round(v, 3) for k, v in em_by_type(warm_table).items()})
    # Step 0 of the curves: the warm start, under the same keys as later evaluations.
    trainer.logger.log(0, {k.replace("warm_start/", "eval/", 1): v for k, v in warm_metrics.items()})
    trainer.train()
    final_step = trainer.step_count
    trained_table = json.loads((out_dir / "samples" / f"eval_step{final_step}_table.json").read_text())

    summary = summary_of(em_by_type(warm_table), em_by_type(trained_table), warm_table, trained_table,
                         time.perf_counter() - t0)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curve(out_dir / "metrics.jsonl", out_dir / "learning_curve.png")
    export_dir = save_hf(trainer.current_policy(), trainer.model_config,
                         out_dir / "export", tokenizer_dir=paths.tokenizer)

    example, ids = trainer.val_examples[0]
    traj = trainer.rollout([(example, ids)] * trainer.batch_shards, trainer._step_key(0), greedy=True)
    row = score_trajectory([(example, ids)], traj, trainer.tokenizer, trainer.reward_fn, 1)[0]
    print("\n" + render_episode(example.question, episode_segments(traj, 0, trainer.tokenizer)))
    print(f"gold: {example.golden_answers}  →  {'correct' if row['em'] else 'wrong'}")
    print("\n" + summary_table(summary))
    print(f"\nlearning curve: {out_dir / 'learning_curve.png'}\nsummary: {out_dir / 'summary.json'}\n"
          f"exported policy: {export_dir}\nwall time: {summary['wall_seconds']:.0f} s")
    return summary
