"""python -m searchr1_jax.export --checkpoint CHECKPOINT --out HF_DIR [--step N]

Writes the policy of an Orbax training checkpoint as a transformers-loadable directory
(config.json, safetensors, tokenizer files). CHECKPOINT is a run's output directory
(`runs/X`), its `checkpoints/` folder (`runs/X/checkpoints`), or one step's folder
(`runs/X/checkpoints/2`, which picks that step); otherwise the latest complete step is used
unless --step. Anything else is refused with a one-line error.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import jax
from flax import nnx

from searchr1_jax.checkpoint import Checkpointer
from searchr1_jax.models import Decoder, load_config, save_hf


def _step_numbers(directory: Path) -> list[int]:
    """Steps Orbax has finished in `directory` (its numbered sub-folders)."""
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def resolve_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, int]:
    """(the checkpoints folder, the step to read) for a run, checkpoints or step directory.

    A step folder is a numbered folder inside a checkpoints folder; it fixes the step (a
    different `step` is an error). Otherwise `step` defaults to the latest complete one.
    Raises FileNotFoundError / ValueError naming the path and what was expected.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"checkpoint path {str(path)!r} is a file; expected a run directory, its "
                         "checkpoints/ folder or one step's folder")
    if path.name.isdigit() and (path / "record").is_dir():  # an Orbax step folder holds one folder per item
        if step is not None and step != int(path.name):
            raise ValueError(f"{str(path)!r} is the folder of step {int(path.name)} but --step {step} was given")
        root, step = path.parent, int(path.name)
    elif (path / "checkpoints").is_dir():
        root = path / "checkpoints"
    else:
        root = path
    steps = _step_numbers(root)
    if not steps:
        partial = sorted(p.name for p in root.iterdir() if p.name.split(".")[0].isdigit())
        detail = f" (only unfinished saves: {partial[:3]})" if partial else ""
        raise FileNotFoundError(f"no complete checkpoint in {str(root)!r}{detail}: expected a run directory, "
                                "its checkpoints/ folder or one step's folder (e.g. runs/X/checkpoints/2)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"step {step} is not among the complete checkpoints of {str(root)!r}: {steps}")
    return root, step


def checkpoint_dir(path: str | Path) -> Path:
    """The checkpoints folder of a run, checkpoints or step directory (see resolve_checkpoint)."""
    return resolve_checkpoint(path)[0]


def load_policy(path: str | Path, step: int | None = None, dtype=None) -> tuple[Decoder, dict]:
    """The policy Decoder of a checkpoint, plus its JSON record (model/tokenizer paths, step).

    `path` is a run directory, its checkpoints/ folder or one step's folder; `step` defaults
    to the step folder's or the latest.
    """
    root, step = resolve_checkpoint(path, step)
    ckpt = Checkpointer(root, async_save=False)
    # Always closed: an Orbax manager left open at interpreter exit fails in its finaliser
    # ("cannot schedule new futures after shutdown") and hides the real error.
    try:
        record = ckpt.read_record(step)
        cfg = load_config(record["model_path"])
        abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
        graphdef, abstract_params = nnx.split(abstract)
        items, record = ckpt.restore(step, {"policy": abstract_params})
    finally:
        ckpt.close()
    params = items["policy"]
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    return nnx.merge(graphdef, params), record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="run output dir, its checkpoints/ folder, or one step's folder (checkpoints/N)")
    parser.add_argument("--out", required=True, help="output directory (Hugging Face format)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="tensor dtype of the export (default: as trained)")
    args = parser.parse_args(argv)
    try:
        model, record = load_policy(args.checkpoint, args.step)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"export: error: {e}") from None
    out = save_hf(model, model.config, args.out, tokenizer_dir=record["tokenizer_path"], dtype=args.dtype)
    print(f"exported step {record['step']} of {args.checkpoint} to {out}")


if __name__ == "__main__":
    main()
