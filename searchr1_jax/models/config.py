"""Decoder hyperparameters, read from (and written back to) a Hugging Face `config.json`.

Supported families: Qwen2/Qwen2.5 (`model_type: qwen2`, q/k/v bias), Qwen3 (`qwen3`, q/k
RMSNorm, explicit head_dim), Llama 3.x (`llama`, optional llama3 RoPE scaling). Both the
transformers 4 layout (`rope_theta`, `rope_scaling`) and the 5 layout (`rope_parameters`)
are accepted.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_FAMILIES = ("qwen2", "qwen3", "llama")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters. `rope_type` in SUPPORTED_ROPE_TYPES."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape and architecture of a causal decoder.

    `hf_config` keeps the raw `config.json` dict it came from (if any) so that export
    writes back exactly what the user had; it takes no part in equality or hashing, so
    a ModelConfig can be a static attribute of a jitted module.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"model family {self.family!r} is not supported; use one of {SUPPORTED_FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope type {self.rope.rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}"
            )

    @property
    def num_params(self) -> int:
        """Parameter count of the decoder (embeddings + layers + head)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * q + 2 * h * kv + q * h
        attn += (q + 2 * kv) * self.qkv_bias + h * self.o_bias + 2 * d * self.qk_norm
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias
        layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head


def _as_int_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _rope_from_hf(raw: dict, source: str) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or {})
    # transformers 4 files keep scaling apart; the 5 layout (rope_parameters) wins on conflict.
    for key, value in (raw.get("rope_scaling") or {}).items():
        params.setdefault(key, value)
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def config_from_hf_dict(raw: dict, source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a parsed HF `config.json`. `source` names it in errors."""
    family = raw.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"{source}: model_type {family!r} is not supported; use one of {SUPPORTED_FAMILIES}")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {missing}")
    if raw.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported")
    num_heads = int(raw["num_attention_heads"])
    head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
    attention_bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        family=family,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(raw, source),
        # Qwen2 hard-codes bias on q/k/v (none on o); Qwen3 and Llama follow attention_bias.
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)) if family == "llama" else False,
        qk_norm=family == "qwen3",
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
        eos_token_ids=_as_int_tuple(raw.get("eos_token_id")),
        bos_token_id=raw.get("bos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        hf_config=dict(raw),
    )


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read `<model_dir>/config.json`; errors name the path."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in model directory {str(model_dir)!r}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf_dict(raw, source=str(path))


def config_to_hf_dict(cfg: ModelConfig) -> dict:
    """The `config.json` to write for `cfg`: the original dict when there is one.

    Without one (a model built here), the dict comes from the transformers config class
    of the family, so that `from_pretrained` of the installed transformers reads it.
    """
    if cfg.hf_config:
        return dict(cfg.hf_config)
    import transformers

    cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "llama": transformers.LlamaConfig}[cfg.family]
    rope = {"rope_type": cfg.rope.rope_type, "rope_theta": cfg.rope.theta}
    if cfg.rope.rope_type != "default":
        rope.update(factor=cfg.rope.factor, low_freq_factor=cfg.rope.low_freq_factor,
                    high_freq_factor=cfg.rope.high_freq_factor,
                    original_max_position_embeddings=cfg.rope.original_max_position_embeddings)
    kwargs: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=cfg.bos_token_id, pad_token_id=cfg.pad_token_id,
        eos_token_id=list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else
        (cfg.eos_token_ids[0] if cfg.eos_token_ids else None),
    )
    if cfg.family != "qwen2":
        kwargs["attention_bias"] = cfg.qkv_bias
    if cfg.family == "llama":
        kwargs["mlp_bias"] = cfg.mlp_bias
    return cls(**kwargs).to_dict()
