"""python -m searchr1_jax.export --checkpoint RUN_OR_CHECKPOINT_DIR --out HF_DIR [--step N]

Writes the policy of an Orbax training checkpoint as a transformers-loadable directory
(config.json, safetensors, tokenizer files). RUN_OR_CHECKPOINT_DIR is a run's output
directory or its `checkpoints/` folder; the latest complete step is used unless --step.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import jax
from flax import nnx

from searchr1_jax.checkpoint import Checkpointer
from searchr1_jax.models import Decoder, load_config, save_hf


def checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    return path


def load_policy(path: str | Path, step: int | None = None, dtype=None) -> tuple[Decoder, dict]:
    """The policy Decoder of a checkpoint, plus its JSON record (model/tokenizer paths, step)."""
    ckpt = Checkpointer(checkpoint_dir(path), async_save=False)
    record = ckpt.read_record(step)
    cfg = load_config(record["model_path"])
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract)
    items, record = ckpt.restore(step if step is not None else record["step"], {"policy": abstract_params})
    ckpt.close()
    params = items["policy"]
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    return nnx.merge(graphdef, params), record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run output dir or its checkpoints/ folder")
    parser.add_argument("--out", required=True, help="output directory (Hugging Face format)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="tensor dtype of the export (default: as trained)")
    args = parser.parse_args(argv)
    try:
        model, record = load_policy(args.checkpoint, args.step)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    out = save_hf(model, model.config, args.out, tokenizer_dir=record["tokenizer_path"], dtype=args.dtype)
    print(f"exported step {record['step']} of {args.checkpoint} to {out}")


if __name__ == "__main__":
    main()
