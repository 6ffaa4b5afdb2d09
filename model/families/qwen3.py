"""Qwen3: Llama with a per-head RMSNorm on q and k before RoPE (q_norm / k_norm over head_dim), an explicit head_dim
(128 when config.json leaves it out, Qwen3Config's default), biases on q/k/v/o together (`attention_bias`), and
optional sliding layers from `max_window_layers` on (`use_sliding_window`), as in Qwen2. Trained without a BOS token in
front (TransformerLens's default_prepend_bos=False)."""

from __future__ import annotations

from ..hf_config import positive_int, rope_params
from .base import Family
from .llama import llama_weights
from .qwen2 import export_config, sliding_layer_types


def read_config(cfg: dict, common: dict, source: str) -> dict:
    layer_types, window = sliding_layer_types(cfg, common["n_layers"])
    bias = bool(cfg.get("attention_bias", False))
    return dict(common, d_head=positive_int(cfg, "head_dim", source, 128), qkv_bias=bias, o_bias=bias, qk_norm="head",
                layer_types=layer_types, sliding_window=window,
                rope={t: rope_params(cfg, source, common["max_position_embeddings"]) for t in set(layer_types)})


FAMILY = Family(model_type="qwen3", architecture="Qwen3ForCausalLM", read_config=read_config, weights=llama_weights,
                prepend_bos=False, export_config=export_config, gguf_arch="qwen3")
