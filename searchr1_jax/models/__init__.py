"""Flax NNX causal decoders (Qwen2/2.5, Qwen3, Llama 3.x), value model, HF import/export."""
from searchr1_jax.models.config import ModelConfig, RopeConfig, config_from_hf_dict, load_config
from searchr1_jax.models.decoder import Decoder, ValueModel, positions_from_mask
from searchr1_jax.models.hf_io import load_hf, save_hf
from searchr1_jax.models.kv_cache import KVCache
from searchr1_jax.models.tokenizer import load_tokenizer

__all__ = ["ModelConfig", "RopeConfig", "config_from_hf_dict", "load_config", "Decoder",
           "ValueModel", "positions_from_mask", "load_hf", "save_hf", "KVCache", "load_tokenizer"]
