"""Hugging Face safetensors ↔ Flax decoder, through one declarative key map per family.

`KEY_MAP` rows are (HF key template, our parameter path template, transpose?). `{i}` stands
for the layer index. Rows whose parameter a family does not have (biases, q/k norms, an
untied head) are dropped by `expand_key_map` from the model config, so a checkpoint with
a missing or unexpected tensor is reported by name instead of half-loaded.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from searchr1_jax.models.config import ModelConfig, config_to_hf_dict, load_config
from searchr1_jax.models.decoder import Decoder

# (HF key, Flax path, transpose). Linear kernels are [in, out] here, [out, in] in torch.
_ATTN = "model.layers.{i}.self_attn"
_OURS_ATTN = "model.layers.{i}.self_attn"
KEY_MAP: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "model.embed_tokens", False),
    ("model.norm.weight", "model.norm.scale", False),
    ("lm_head.weight", "lm_head.kernel", True),
    ("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.scale", False),
    ("model.layers.{i}.post_attention_layernorm.weight",
     "model.layers.{i}.post_attention_layernorm.scale", False),
    (f"{_ATTN}.q_proj.weight", f"{_OURS_ATTN}.q_proj.kernel", True),
    (f"{_ATTN}.k_proj.weight", f"{_OURS_ATTN}.k_proj.kernel", True),
    (f"{_ATTN}.v_proj.weight", f"{_OURS_ATTN}.v_proj.kernel", True),
    (f"{_ATTN}.o_proj.weight", f"{_OURS_ATTN}.o_proj.kernel", True),
    (f"{_ATTN}.q_proj.bias", f"{_OURS_ATTN}.q_proj.bias", False),
    (f"{_ATTN}.k_proj.bias", f"{_OURS_ATTN}.k_proj.bias", False),
    (f"{_ATTN}.v_proj.bias", f"{_OURS_ATTN}.v_proj.bias", False),
    (f"{_ATTN}.o_proj.bias", f"{_OURS_ATTN}.o_proj.bias", False),
    (f"{_ATTN}.q_norm.weight", f"{_OURS_ATTN}.q_norm.scale", False),
    (f"{_ATTN}.k_norm.weight", f"{_OURS_ATTN}.k_norm.scale", False),
    ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.kernel", True),
    ("model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.kernel", True),
    ("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.kernel", True),
    ("model.layers.{i}.mlp.gate_proj.bias", "model.layers.{i}.mlp.gate_proj.bias", False),
    ("model.layers.{i}.mlp.up_proj.bias", "model.layers.{i}.mlp.up_proj.bias", False),
    ("model.layers.{i}.mlp.down_proj.bias", "model.layers.{i}.mlp.down_proj.bias", False),
)

# What a Hugging Face tokenizer directory may hold (fast and slow tokenizers, chat template,
# generation defaults): the only files an export copies beside the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", "generation_config.json")


def _path_tuple(dotted: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def expand_key_map(model_paths: set[tuple]) -> dict[str, tuple[tuple, bool]]:
    """HF key → (our param path, transpose) for every parameter the model has."""
    num_layers = 1 + max((p[2] for p in model_paths if p[:2] == ("model", "layers")), default=-1)
    mapping = {}
    for hf_key, ours, transpose in KEY_MAP:
        for i in (range(num_layers) if "{i}" in hf_key else [None]):
            path = _path_tuple(ours.format(i=i))
            if path in model_paths:
                mapping[hf_key.format(i=i)] = (path, transpose)
    unmapped = model_paths - {p for p, _ in mapping.values()}
    if unmapped:  # a parameter the table forgot: a bug here, not in the user's files
        raise AssertionError(f"parameters with no HF key: {sorted(unmapped)}")
    return mapping


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def _read_tensors(files: list[Path]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for key in st.keys():
                tensors[key] = st.get_tensor(key)
    return tensors


def load_hf(model_dir: str | Path, dtype=jnp.float32, *, compute_dtype=None,
            remat: bool = False) -> tuple[Decoder, ModelConfig]:
    """Load a local HF checkpoint directory into a `Decoder`.

    dtype: parameter dtype; compute_dtype: matmul dtype (defaults to dtype).
    Reads `config.json` and every safetensors shard (via the index when present). A
    missing or unexpected tensor, or a shape mismatch, raises with the offending names.
    """
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=compute_dtype or dtype,
                                           param_dtype=dtype, remat=remat))
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    mapping = expand_key_map(set(flat))
    tensors = _read_tensors(_safetensors_files(model_dir))
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints still store the copy
    missing = sorted(set(mapping) - set(tensors))
    unexpected = sorted(k for k in set(tensors) - set(mapping) if not k.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise ValueError(f"{model_dir}: checkpoint does not match a {cfg.family} model with this config.json"
                         f"\n  missing keys: {missing}\n  unexpected keys: {unexpected}")
    for hf_key, (path, transpose) in mapping.items():
        array = tensors[hf_key].T if transpose else tensors[hf_key]
        variable = flat[path]
        if tuple(array.shape) != tuple(variable.shape):
            raise ValueError(f"{model_dir}: tensor {hf_key} has shape {tuple(tensors[hf_key].shape)}, "
                             f"expected {tuple(variable.shape)[::-1] if transpose else tuple(variable.shape)}")
        variable.set_value(jnp.asarray(array, dtype=variable.dtype))
    return nnx.merge(graphdef, state), cfg


def _to_numpy(x: jax.Array) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def save_hf(model: Decoder, cfg: ModelConfig | None, out_dir: str | Path,
            tokenizer_dir: str | Path | None = None, *, max_shard_bytes: int = 4 << 30,
            dtype=None) -> Path:
    """Write `model` as a transformers-loadable directory.

    Writes `config.json`, `model*.safetensors` (sharded with an index above
    `max_shard_bytes`), and copies the tokenizer files from `tokenizer_dir`. Tensors are
    saved in `dtype` (default: the parameters' dtype). Returns the output path.
    """
    cfg = cfg or model.config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    mapping = expand_key_map(set(flat))
    tensors: dict[str, np.ndarray] = {}
    for hf_key, (path, transpose) in mapping.items():
        array = _to_numpy(flat[path].get_value())
        if dtype is not None:
            array = array.astype(jnp.dtype(dtype))
        tensors[hf_key] = np.ascontiguousarray(array.T if transpose else array)

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    for stale in out_dir.glob("model*.safetensors*"):
        stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.nbytes for t in tensors.values())
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    hf_config = config_to_hf_dict(cfg)
    saved_dtype = str(next(iter(tensors.values())).dtype)
    hf_config["torch_dtype"] = saved_dtype
    if "dtype" in hf_config:
        hf_config["dtype"] = saved_dtype
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir


def copy_tokenizer_files(tokenizer_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the tokenizer files (`TOKENIZER_FILES`, by name) of `tokenizer_dir` to `out_dir`;
    returns their names. Nothing else is copied: a checkpoint's record names the directory,
    and an export must not carry whatever else lies there. A file that resolves outside the
    directory (a symlink) is refused."""
    src = Path(tokenizer_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(src)!r} does not exist")
    root = src.resolve()
    copied = []
    for name in TOKENIZER_FILES:
        f = src / name
        if not f.is_file():
            continue
        if not f.resolve().is_relative_to(root):
            raise ValueError(f"tokenizer file {str(f)!r} resolves outside {str(src)!r}: refusing to copy it")
        shutil.copyfile(f, Path(out_dir) / name)
        copied.append(name)
    return copied