"""The Search-R1 training loop: rollout → rewards → reference/values → advantages → updates.

One `Trainer.step()`:
  1. the next batch of prompts (`PromptStream`, resumable);
  2. multi-turn rollouts with the policy (n samples per prompt), retrieval inside;
  3. rewards on the response text (host), per data_source reward functions;
  4. old log-probs (policy), reference log-probs (when a KL term is used), values (PPO);
  5. advantages (`rl.compute_advantages`), then `ppo_epochs` passes over mini-batches of
     micro-batches for the critic and the policy;
  6. metrics (+ time breakdown) to the progress bar, metrics.jsonl, TensorBoard;
  7. a checkpoint every `save_every` steps, at the end, and on SIGTERM.

Determinism: the rollout key of step t is fold_in(seed key, t), mini-batch order is drawn
from (seed, t), and the data order from (seed, epoch); so a run resumed from a checkpoint
repeats an uninterrupted run exactly.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from searchr1_jax import parallel, rl, scoring
from searchr1_jax.checkpoint import Checkpointer
from searchr1_jax.config import CRITIC_ALGORITHMS, GROUP_ALGORITHMS, ConfigError, require_path, validate
from searchr1_jax.evaluate import encode_prompts, greedy_rows, score_trajectory
from searchr1_jax.metrics_log import MetricsLogger
from searchr1_jax.prompt_stream import PromptStream
from searchr1_jax.train_step import (CriticBatch, LossConfig, PolicyBatch, SequenceBatch, compute_logprobs,
                                     compute_values, critic_update, make_optimizer, policy_update)

log = logging.getLogger("searchr1_jax")

ESTIMATOR_OF = {"ppo": "gae", "grpo": "grpo", "reinforce_pp": "reinforce_pp", "rloo": "rloo",
                "drgrpo": "drgrpo"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SEQ_BUCKET = 64  # smallest width trajectories are trimmed to before scoring


def output_dir_of(config: ml_collections.ConfigDict) -> Path:
    return Path(config.trainer.output_dir or f"runs/{config.name}")


def load_examples(files: str, field: str) -> list:
    """The examples of the comma-separated parquet `files` of config field `field`; a missing or
    unreadable file is a ConfigError naming the field."""
    from searchr1_jax.data import read_examples

    examples = []
    for path in files.split(","):
        try:
            examples.extend(read_examples(path.strip()))
        except FileNotFoundError as e:
            raise ConfigError(f"config.{field}: {e} (make it with python -m searchr1_jax.data.convert "
                              "--split train|test --out DIR ...)") from None
        except ValueError as e:
            raise ConfigError(f"config.{field}: {e}") from None
    if not examples:
        raise ConfigError(f"config.{field}: {files!r} holds no rows")
    return examples


def build_retriever(config: ml_collections.ConfigDict):
    """The in-process index of `retriever.index_dir` or the HTTP client of `retriever.url`,
    after one probe query (a dead URL fails here, before anything is compiled)."""
    from searchr1_jax.retrieval.connect import open_retriever

    r = config.retriever
    if not (r.url or r.index_dir):
        raise ConfigError("set config.retriever.index_dir (a built index) or config.retriever.url (a server)")
    return open_retriever(r.index_dir, r.url, timeout_s=r.timeout_s, max_retries=r.max_retries,
                          max_wait_s=r.max_wait_s, index_name="config.retriever.index_dir",
                          url_name="config.retriever.url")


def claim_output_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to start a new run in a directory that holds another run's files (its checkpoints
    would be skipped as existing steps and its metrics appended to). With `overwrite`, process 0
    moves the old directory aside and returns where it went; with `resume`, nothing to do."""
    if resume or not out_dir.is_dir() or not any(out_dir.iterdir()):
        return None
    if not overwrite:
        raise ConfigError(f"config.trainer.output_dir: {str(out_dir)!r} already holds a run; continue it with "
                          "--config.trainer.resume=True, or move it aside with --config.trainer.overwrite=True")
    if jax.process_index() != 0:
        return None
    aside = out_dir.with_name(f"{out_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.rename(aside)
    log.warning("moved the earlier run in %s aside to %s (config.trainer.overwrite=True)", out_dir, aside)
    return aside


def trim_to_bucket(arrays: dict[str, np.ndarray], used: int) -> dict[str, np.ndarray]:
    """Cut [B, S] arrays to the smallest power-of-two width (≥ SEQ_BUCKET) holding `used`
    slots: a handful of compiled shapes, at most 2× padding."""
    width = min(next(iter(arrays.values())).shape[1], max(SEQ_BUCKET, 1 << (max(used, 1) - 1).bit_length()))
    return {k: v[:, :width] for k, v in arrays.items()}


def describe_algorithm(config: ml_collections.ConfigDict) -> str:
    """Log, in one line, what the algorithm settings do (advantages, critic, where the KL term
    goes), and warn where they differ from Search-R1's recipe for that algorithm."""
    a, n = config.algorithm, config.rollout.n_samples
    parts = [f"advantages: {ESTIMATOR_OF[a.name]}" + (f" over groups of {n} samples" if a.name in GROUP_ALGORITHMS
                                                      else "")]
    parts.append("critic: trained from the base model" if a.name in CRITIC_ALGORITHMS else "critic: none")
    if a.kl_coef <= 0 or not (a.kl_in_reward or a.kl_loss):
        parts.append("KL to the reference: none")
    elif a.kl_in_reward:
        parts.append(f"KL to the reference: in the reward (k1, coef {a.kl_coef}, {a.kl_controller})")
    else:
        parts.append(f"KL to the reference: a loss term ({a.kl_estimator}, coef {a.kl_coef})")
    line = f"algorithm {a.name}: " + "; ".join(parts)
    log.info("%s", line)
    if a.name in GROUP_ALGORITHMS and a.kl_in_reward and a.kl_coef > 0:
        log.warning("algorithm %s with the KL term in the reward: Search-R1's GRPO puts it in the loss "
                    "(configs/qwen3b_grpo.py: --config.algorithm.kl_in_reward=False "
                    "--config.algorithm.kl_loss=True)", a.name)
    return line


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss, gradient or update."""


class Trainer:
    def __init__(self, config: ml_collections.ConfigDict, *, install_signal_handler: bool = True):
        from searchr1_jax.models import ValueModel, load_hf, load_tokenizer
        from searchr1_jax.models.decoder import set_attention
        from searchr1_jax.rewards import make_reward_fn

        self.config = validate(config)
        c = config
        self.out_dir = output_dir_of(c)
        self.is_main = jax.process_index() == 0
        model_path = require_path(c, "model.path", kind="Hugging Face model directory")
        tok_path = c.model.tokenizer_path or model_path
        self.tokenizer = load_tokenizer(tok_path)
        # Data and retriever first: a user's mistake there shows before minutes of loading.
        require_path(c, "data.train_files", kind="Search-R1 parquet file")
        self.train_examples = self._encode(c.data.train_files, "data.train_files")
        self.val_examples = self._encode(c.data.val_files, "data.val_files") if c.data.val_files else []
        self.retriever = build_retriever(c)
        self.reward_fn = make_reward_fn(c.reward)
        claim_output_dir(self.out_dir, resume=c.trainer.resume, overwrite=c.trainer.overwrite)
        parallel.sync_processes("output_dir")
        policy, self.model_config = load_hf(model_path, dtype=DTYPES[c.model.param_dtype],
                                            compute_dtype=DTYPES[c.model.compute_dtype], remat=c.model.remat)
        set_attention(policy, c.model.attention)
        self.algorithm = c.algorithm.name
        self.kl_coef = c.algorithm.kl_coef
        self.use_reference = self.kl_coef > 0 and (c.algorithm.kl_in_reward or c.algorithm.kl_loss)
        describe_algorithm(c)
        mesh_cfg = parallel.mesh_config_from(c.mesh)
        self.mesh = parallel.make_mesh(mesh_cfg)
        self.rules = mesh_cfg.resolved_rules
        mini_rows = c.trainer.mini_batch_size * c.rollout.n_samples
        if mini_rows % self.batch_shards:
            raise ConfigError(f"config.trainer.mini_batch_size × config.rollout.n_samples = {mini_rows} sequences "
                              f"must be a multiple of the mesh's data × fsdp = {self.batch_shards} batch shards")
        parallel.report_memory(self._memory_estimate(mesh_cfg.preset), mesh_cfg.device_memory_gb)
        parallel.shard_module(policy, self.mesh, self.rules)
        self.graphdef, policy_params = nnx.split(policy)
        self.kl_controller = rl.make_kl_controller(c.algorithm.kl_controller, c.algorithm.kl_coef,
                                                   c.algorithm.kl_target, c.algorithm.kl_horizon)

        t = c.trainer
        updates_per_step = (t.batch_size // t.mini_batch_size) * t.ppo_epochs
        total_updates = t.total_steps * updates_per_step
        opt = dict(weight_decay=c.optim.weight_decay, grad_clip=c.optim.grad_clip, b1=c.optim.b1, b2=c.optim.b2)
        self.actor_tx = make_optimizer(c.optim.actor_lr, int(c.optim.actor_warmup_ratio * total_updates), **opt)
        self.critic_tx = make_optimizer(c.optim.critic_lr, int(c.optim.critic_warmup_ratio * total_updates), **opt)
        arrays = {"policy": policy_params, "policy_opt": self._init_optimizer(self.actor_tx, policy_params),
                  # Replicated over the mesh, so a restored key sits with the sharded params.
                  "rng": jax.device_put(jax.random.key_data(jax.random.key(c.seed)),
                                        jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))}
        if self.algorithm in CRITIC_ALGORITHMS:
            critic_src = policy
            if c.model.critic_path and c.model.critic_path != model_path:
                critic_src, _ = load_hf(c.model.critic_path, dtype=DTYPES[c.model.param_dtype],
                                        compute_dtype=DTYPES[c.model.compute_dtype], remat=c.model.remat)
                set_attention(critic_src, c.model.attention)
            critic = ValueModel.from_decoder(critic_src, rngs=nnx.Rngs(c.seed + 1), remat=c.model.remat)
            parallel.shard_module(critic, self.mesh, self.rules)
            self.critic_graphdef, critic_params = nnx.split(critic)
            arrays["critic"] = critic_params
            arrays["critic_opt"] = self._init_optimizer(self.critic_tx, critic_params)
        # The reference is the initial policy, frozen; a copy so donation never aliases it.
        self.reference = jax.tree.map(jnp.copy, policy_params) if self.use_reference else None
        self.arrays = arrays

        self.loss_cfg = LossConfig(
            aggregation=c.algorithm.loss_agg_mode, clip_low=c.algorithm.clip_low, clip_high=c.algorithm.clip_high,
            dual_clip=c.algorithm.dual_clip or None, entropy_coef=c.algorithm.entropy_coef,
            kl_loss_coef=self.kl_coef if (c.algorithm.kl_loss and self.use_reference) else 0.0,
            kl_estimator=c.algorithm.kl_estimator, value_clip=c.algorithm.value_clip,
            temperature=c.rollout.temperature if c.rollout.temperature > 0 else 1.0)
        self._jit_functions()

        self.stream = PromptStream(self.train_examples, t.batch_size, seed=c.seed, shuffle=c.data.shuffle)
        self.policy_model = policy
        self._drivers: dict[bool, object] = {}
        self.step_count = 0
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", keep=t.keep_checkpoints)
        self.logger = MetricsLogger(self.out_dir, enabled=self.is_main, wandb_project=t.wandb_project,
                                    run_name=c.name, config=c.to_dict())
        self._stop_requested = False
        self._retries_seen = 0
        self.bad_steps = 0  # consecutive steps whose update was not applied (non-finite)
        self._save_owed = False  # a save fell on an unhealthy step
        if install_signal_handler:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        if t.resume:
            self.resume()

    # ------------------------------------------------------------------ setup helpers
    def _encode(self, files: str, field: str) -> list[tuple]:
        """(example, prompt ids) pairs of the parquet files of config field `field`."""
        c = self.config
        try:
            return encode_prompts(load_examples(files, field), self.tokenizer, c.data.template,
                                  c.rollout.max_prompt_tokens)
        except ConfigError:
            raise
        except ValueError as e:  # no prompt fits max_prompt_tokens, a template the tokenizer lacks
            raise ConfigError(f"config.{field}: {e}") from None

    @property
    def batch_shards(self) -> int:
        """Rows of every batch must be a multiple of this (the mesh's data × fsdp)."""
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def current_policy(self):
        """The policy Decoder with the current (trained) weights."""
        return nnx.merge(self.graphdef, self.arrays["policy"])

    def _memory_estimate(self, preset: str):
        c, r, t = self.config, self.config.rollout, self.config.trainer
        workload = parallel.Workload(
            rollout_batch=t.batch_size * r.n_samples, cache_length=r.max_context_tokens,
            prefill_rows=t.batch_size * r.n_samples, prefill_chunk=r.max_prompt_tokens,
            train_micro_batch=t.micro_batch_size, train_length=r.max_context_tokens, remat=c.model.remat)
        compute = DTYPES[c.model.compute_dtype]
        precision = parallel.Precision(param_dtype=DTYPES[c.model.param_dtype], compute_dtype=compute,
                                       cache_dtype=compute)
        return parallel.estimate_memory(self.model_config, self.mesh, self.rules, workload, precision,
                                        critic=self.algorithm in CRITIC_ALGORITHMS,
                                        reference=self.use_reference, preset=preset)

    def _init_optimizer(self, tx, params):
        """Optimizer state placed like its parameters (moments) or replicated (counters)."""
        state = tx.init(params)
        shardings = parallel.optimizer_shardings(state, jax.tree.map(lambda x: x.sharding, params))
        return jax.device_put(state, shardings)

    def _sharded(self, tree):
        """Host or device [B, ...] arrays → device arrays with rows over the batch axes."""
        return parallel.shard_batch(tree, self.mesh, self.rules)

    def driver(self, greedy: bool):
        """The rollout driver for training (sampling, n per prompt) or evaluation (greedy, 1)."""
        from searchr1_jax.rollout import RolloutConfig, RolloutDriver

        if greedy not in self._drivers:
            r = self.config.rollout
            cfg = RolloutConfig(max_turns=r.max_turns, max_new_tokens=r.max_new_tokens,
                                max_obs_tokens=r.max_obs_tokens, max_prompt_tokens=r.max_prompt_tokens,
                                max_context_tokens=r.max_context_tokens, temperature=r.temperature or 1.0,
                                top_p=r.top_p, top_k=r.top_k, greedy=greedy or r.temperature == 0,
                                n_samples=1 if greedy else r.n_samples, topk=self.config.retriever.topk)
            self._drivers[greedy] = RolloutDriver(self.policy_model, self.tokenizer, cfg, mesh=self.mesh)
        return self._drivers[greedy]

    def _jit_functions(self):
        cfg = self.loss_cfg
        num_micro = (self.config.trainer.mini_batch_size * self.config.rollout.n_samples
                     // self.config.trainer.micro_batch_size)
        self._logprobs = jax.jit(lambda p, s: compute_logprobs(self.graphdef, p, s, cfg.temperature, cfg.logit_chunk))
        self._policy_update = jax.jit(
            lambda p, o, b: policy_update(self.graphdef, p, o, b, tx=self.actor_tx, cfg=cfg, num_micro=num_micro),
            donate_argnums=(0, 1))
        if self.algorithm in CRITIC_ALGORITHMS:
            self._values = jax.jit(lambda p, s: compute_values(self.critic_graphdef, p, s))
            self._critic_update = jax.jit(
                lambda p, o, b: critic_update(self.critic_graphdef, p, o, b, tx=self.critic_tx, cfg=cfg,
                                              num_micro=num_micro),
                donate_argnums=(0, 1))

    def _on_sigterm(self, signum, frame):
        log.warning("SIGTERM received: finishing this step, saving a checkpoint, then exiting")
        self._stop_requested = True

    # ------------------------------------------------------------------ checkpoints
    def _record(self) -> dict:
        c = self.config
        return {"step": self.step_count, "data": self.stream.state(), "kl_coef": float(self.kl_controller.value),
                "total_steps": c.trainer.total_steps, "config_name": c.name,
                "model_path": str(Path(c.model.path).absolute()),
                "tokenizer_path": str(Path(c.model.tokenizer_path or c.model.path).absolute()),
                "config": c.to_dict(), "cwd": os.getcwd()}

    def _items(self) -> dict:
        return {"policy": self.arrays["policy"],
                "train_state": {k: v for k, v in self.arrays.items() if k != "policy"}}

    def save(self, *, force: bool = False) -> None:
        self.checkpointer.save(self.step_count, self._items(), self._record(), force=force)

    def resume(self) -> bool:
        """Continue from the newest checkpoint that verifies and reads; newer ones that do not
        are set aside (each named, with why, in one line). Returns whether one was found."""
        rejected, found = [], None
        for step in reversed(self.checkpointer.all_steps()):
            problem = self.checkpointer.verify(step)
            if problem is None:
                try:
                    found = step, *self.checkpointer.restore(step, self._items())
                except Exception as e:  # noqa: BLE001 (any failure to read means: use an older one)
                    problem = f"it cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            if found:
                break
            log.warning("checkpoint step %d skipped: %s", step, problem)
            rejected.append(step)
        if rejected:
            log.warning("set aside unusable checkpoints %s in %s", rejected, self.checkpointer.set_aside(rejected))
        if found is None:
            log.info("no usable checkpoint in %s: starting from step 0", self.checkpointer.directory)
            self.logger.truncate_after(0)
            return False
        step, items, record = found
        self._check_same_run(record)
        self.arrays = {"policy": items["policy"], **items["train_state"]}
        self.step_count = int(record["step"])
        self.stream.restore(record["data"])
        self.kl_controller.value = float(record["kl_coef"])
        before = record.get("total_steps", self.config.trainer.total_steps)
        if before != self.config.trainer.total_steps:
            log.warning("config.trainer.total_steps is %d where the checkpoint's run had %d: the learning-rate "
                        "warm-up (a fraction of all updates) is recomputed for %d steps",
                        self.config.trainer.total_steps, before, self.config.trainer.total_steps)
        self.logger.truncate_after(self.step_count)
        log.info("resumed from step %d (%s)", self.step_count, self.checkpointer.directory)
        return True

    def _check_same_run(self, record: dict) -> None:
        """Refuse a resume whose config changes the run's meaning (see run_identity)."""
        from searchr1_jax.run_identity import changed_fields

        if "config" not in record:
            return
        changes = changed_fields(record["config"], self.config.to_dict(), saved_cwd=record.get("cwd", os.getcwd()),
                                 cwd=os.getcwd())
        if not changes:
            return
        if not self.config.trainer.resume_override:
            raise ConfigError("config.trainer.resume: the checkpoint was trained with another run's settings ("
                              + "; ".join(changes) + "); resume with the same ones, or accept the change with "
                              "--config.trainer.resume_override=True")
        log.warning("resuming with changed settings (config.trainer.resume_override=True): %s", "; ".join(changes))

    # ------------------------------------------------------------------ one step
    def _step_key(self, step: int):
        return jax.random.fold_in(jax.random.wrap_key_data(self.arrays["rng"]), step)

    def rollout(self, items: list, key, *, greedy: bool):
        """Trajectories of `items` ((example, prompt ids) pairs): n_samples rows per prompt
        when sampling, one when greedy."""
        prompts = [ids for _, ids in items]
        return self.driver(greedy).run(prompts, self.retriever, key, params=self.arrays["policy"])

    def score(self, items: list, traj, n_samples: int) -> tuple[np.ndarray, list[dict]]:
        """Rewards [B*n] and per-row records for a rollout of `items`."""
        rows = score_trajectory(items, traj, self.tokenizer, self.reward_fn, n_samples)
        return np.array([r["reward"] for r in rows], np.float32), rows

    def step(self) -> tuple[dict, list[dict]]:
        """One training step; returns (metrics, scored rollout rows)."""
        c = self.config
        n = c.rollout.n_samples
        step = self.step_count + 1
        timings = {}
        t0 = time.perf_counter()
        items = self.stream.next_batch()
        traj = self.rollout(items, self._step_key(step), greedy=False)
        timings["timing/rollout"] = time.perf_counter() - t0
        timings["timing/retrieval"] = float(traj.stats["retrieval_seconds"])
        retries = getattr(self.retriever, "retries_total", 0)  # HTTP only: a counter over the run
        retries, self._retries_seen = retries - self._retries_seen, retries
        scores, rows = self.score(items, traj, n)

        t1 = time.perf_counter()
        arrays = {k: np.asarray(getattr(traj, k)) for k in ("tokens", "attention_mask", "positions", "loss_mask")}
        arrays = trim_to_bucket(arrays, int(np.max(np.asarray(traj.response_end))))
        seq = self._sharded(SequenceBatch(arrays["tokens"].astype(np.int32), arrays["attention_mask"].astype(np.int32),
                                          arrays["positions"].astype(np.int32), arrays["loss_mask"].astype(np.float32)))
        old_logp = self._logprobs(self.arrays["policy"], seq)
        ref_logp = self._logprobs(self.reference, seq) if self.use_reference else jnp.zeros_like(old_logp)
        values = self._values(self.arrays["critic"], seq) if "critic" in self.arrays else None
        timings["timing/ref_values"] = time.perf_counter() - t1

        token_kl = None
        kl_in_reward = c.algorithm.kl_in_reward and self.use_reference
        if kl_in_reward:
            token_kl = rl.kl_estimate(old_logp, ref_logp, seq.loss_mask, "k1")
        group_ids = jnp.repeat(jnp.arange(len(items)), n)
        advantages, returns = rl.compute_advantages(
            ESTIMATOR_OF[self.algorithm], scores=jnp.asarray(scores), loss_mask=seq.loss_mask,
            group_ids=group_ids, values=values, token_kl=token_kl,
            kl_coef=self.kl_controller.value if kl_in_reward else 0.0,
            gamma=c.algorithm.gamma, lam=c.algorithm.lam)

        t2 = time.perf_counter()
        metrics = self._update(step, seq, old_logp, ref_logp, advantages, returns, values)
        timings["timing/update"] = time.perf_counter() - t2
        if self.use_reference:
            kl_now = float(rl.masked_mean(rl.kl_estimate(old_logp, ref_logp, seq.loss_mask, "k1"), seq.loss_mask))
            metrics["actor/reference_kl"] = kl_now
            self.kl_controller.update(kl_now, len(rows))
            metrics["actor/kl_coef"] = self.kl_controller.value
        metrics.update(rl.advantage_return_stats(advantages, returns, seq.loss_mask))
        metrics.update(self._rollout_metrics(rows, traj))
        self.step_count = step
        timings["timing/step"] = time.perf_counter() - t0
        metrics.update(timings)
        metrics["retrieval/retries"] = retries
        return {k: float(v) for k, v in metrics.items()}, rows

    def _update(self, step, seq, old_logp, ref_logp, advantages, returns, values) -> dict:
        c, t = self.config, self.config.trainer
        rows = seq.tokens.shape[0]
        mini_rows = t.mini_batch_size * c.rollout.n_samples
        collected: list[dict] = []
        rng = np.random.default_rng([c.seed, step])
        train_critic = "critic" in self.arrays
        train_actor = step > t.critic_warmup_steps or not train_critic
        host = jax.device_get({"seq": seq, "old_logp": old_logp, "ref_logp": ref_logp, "advantages": advantages,
                               "returns": returns, "values": values})
        for _ in range(t.ppo_epochs):
            order = rng.permutation(rows)
            for lo in range(0, rows, mini_rows):
                idx = order[lo:lo + mini_rows]
                mb = self._sharded(jax.tree.map(lambda x: x[idx], {k: v for k, v in host.items() if v is not None}))
                m = {}
                if train_critic:
                    batch = CriticBatch(mb["seq"], mb["values"], mb["returns"])
                    self.arrays["critic"], self.arrays["critic_opt"], cm = self._critic_update(
                        self.arrays["critic"], self.arrays["critic_opt"], batch)
                    m.update(cm)
                if train_actor:
                    batch = PolicyBatch(mb["seq"], mb["old_logp"], mb["ref_logp"], mb["advantages"])
                    self.arrays["policy"], self.arrays["policy_opt"], am = self._policy_update(
                        self.arrays["policy"], self.arrays["policy_opt"], batch)
                    m.update(am)
                collected.append(m)
        return {k: float(np.mean([float(m[k]) for m in collected])) for k in collected[0]} if collected[0] else {}

    @staticmethod
    def _rollout_metrics(rows: list[dict], traj) -> dict:
        out = {f"rollout/{k}": float(np.mean([r[k] for r in rows]))
               for k in ("reward", "em", "searches", "turns", "valid_actions")}
        lengths = np.asarray(traj.loss_mask).sum(-1)
        out["rollout/response_tokens"] = float(lengths.mean())
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, examples: list | None = None, *, prefix: str = "eval") -> dict:
        """Greedy rollouts over `examples` (default: the validation set, capped at eval_size);
        a per-data_source table written under the output directory. Returns flat metrics."""
        examples = self.val_examples if examples is None else examples
        if self.config.trainer.eval_size:
            examples = examples[:self.config.trainer.eval_size]
        if not examples:
            return {}
        batch = min(self.config.trainer.batch_size * self.config.rollout.n_samples, len(examples))
        rows = greedy_rows(self.driver(greedy=True), self.retriever, self.arrays["policy"], examples,
                           self.tokenizer, self.reward_fn, -(-batch // self.batch_shards) * self.batch_shards,
                           show_progress=self.is_main)
        table = scoring.summarize(rows)
        if self.is_main:
            scoring.write_results(self.out_dir / "samples", table, rows, prefix=f"{prefix}_step{self.step_count}")
        return {f"{prefix}/{source}/{k}": v for source, m in table.items() for k, v in m.items() if k != "n"}

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        from tqdm import tqdm

        t = self.config.trainer
        last = {}
        started = time.perf_counter()
        bar = tqdm(total=t.total_steps, initial=self.step_count, desc="train", disable=not self.is_main,
                   dynamic_ncols=True)
        try:
            while self.step_count < t.total_steps and not self._stop_requested:
                metrics, rows = self.step()
                healthy = self._note_health(metrics)
                if t.eval_every and (self.step_count % t.eval_every == 0 or self.step_count == t.total_steps):
                    metrics.update(self.evaluate())
                self.logger.log(self.step_count, metrics)
                if self.is_main and t.samples_to_log:
                    scoring.write_results(self.out_dir / "samples", {}, rows[:t.samples_to_log],
                                          prefix=f"train_step{self.step_count}")
                last = metrics
                bar.update(1)
                bar.set_postfix({"reward": f"{metrics['rollout/reward']:.3f}",
                                 "searches": f"{metrics['rollout/searches']:.2f}",
                                 "step_s": f"{metrics['timing/step']:.1f}"})
                due = (t.save_every and self.step_count % t.save_every == 0) or self.step_count == t.total_steps
                # A step whose update was not applied is not saved; its save waits for a healthy step.
                self._save_owed = (due or self._save_owed) and not healthy
                if (due or self._save_owed) and healthy:
                    self.save()
                if self.bad_steps >= t.max_bad_steps:
                    raise TrainingDiverged(
                        f"{self.bad_steps} steps in a row ended with a non-finite loss, gradient or update "
                        f"(config.trainer.max_bad_steps = {t.max_bad_steps}); stopped at step {self.step_count}, "
                        f"the last healthy checkpoint is step {self.checkpointer.latest_step()} in "
                        f"{self.checkpointer.directory}")
            if (self._stop_requested and self.bad_steps == 0
                    and self.checkpointer.latest_step() != self.step_count):
                self.save(force=True)
        finally:
            bar.close()
            self.checkpointer.close()
            self.logger.close()
        if self.is_main:
            self.write_summary(time.perf_counter() - started)
        return last

    def _note_health(self, metrics: dict) -> bool:
        """Whether this step's updates were all applied (finite loss, gradient and update);
        counts consecutive unhealthy steps in `bad_steps` and says so in one line each."""
        skipped = {k: v for k, v in metrics.items() if k.endswith("/skipped_update") and v > 0}
        losses = {k: v for k, v in metrics.items() if k.endswith("/loss") and not np.isfinite(v)}
        if not skipped and not losses:
            self.bad_steps = 0
            return True
        self.bad_steps += 1
        log.warning("step %d: non-finite loss, gradient or update (%s): the update was not applied and the step "
                    "is not saved (%d in a row; the run stops at %d)", self.step_count,
                    ", ".join(f"{k} {v:.3g}" for k, v in {**skipped, **losses}.items()), self.bad_steps,
                    self.config.trainer.max_bad_steps)
        return False

    def write_summary(self, seconds: float) -> dict:
        """Print the closing summary and write it to `run_summary.json` (process 0)."""
        import json

        from searchr1_jax.metrics_log import read_metrics
        from searchr1_jax.run_summary import format_summary, summarize

        metrics = self.out_dir / "metrics.jsonl"
        summary = summarize(self.out_dir, read_metrics(metrics) if metrics.exists() else [],
                            self.checkpointer.all_steps(), total_steps=self.config.trainer.total_steps,
                            step=self.step_count, stopped_early=self.step_count < self.config.trainer.total_steps,
                            seconds=seconds)
        (self.out_dir / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print("\n" + format_summary(summary), flush=True)
        return summary
