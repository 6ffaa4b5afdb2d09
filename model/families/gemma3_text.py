"""Gemma 3 (text): (1 + w) RMSNorms, embeddings x sqrt(d_model), q/k norms per head, a norm after attention and after
the MLP (four per block), GeGLU; local (sliding) layers with their own RoPE base between global ones."""

from __future__ import annotations

import math

from ..hf_config import FULL, SLIDING, positive_float, rope_params
from .base import Family
from .llama import llama_weights

# the four-norm layout: post_attention_layernorm normalises the attention OUTPUT here (in Llama it is the MLP's input)
SANDWICH_NORMS = {
    "input_layernorm.weight": "ln1.weight",
    "post_attention_layernorm.weight": "ln1_post.weight",
    "pre_feedforward_layernorm.weight": "ln2.weight",
    "post_feedforward_layernorm.weight": "ln2_post.weight",
}


def sandwich_weights(cfg):
    return llama_weights(cfg, block=SANDWICH_NORMS, ignored=(r"^model\.embed_tokens\.embed_scale$",))


def read_config(cfg: dict, common: dict, source: str) -> dict:
    n_layers = common["n_layers"]
    pattern = cfg.get("sliding_window_pattern", 6)
    layer_types = cfg.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
    max_pos = common["max_position_embeddings"]
    rp = cfg.get("rope_parameters") or {}
    if FULL in rp or SLIDING in rp:  # transformers 5 format: one block per layer type
        full_block = dict(rp.get(FULL) or {})
        local_block = dict(rp.get(SLIDING) or {})
    else:  # legacy: rope_theta (+ rope_scaling) for global layers, rope_local_base_freq for local layers
        full_block = dict(cfg.get("rope_scaling") or {})
        full_block.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        local_block = {"rope_type": "default", "rope_theta": positive_float(cfg, "rope_local_base_freq", source, 10_000.0)}
    full_block.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
    local_block.setdefault("rope_theta", positive_float(cfg, "rope_local_base_freq", source, 10_000.0))
    bias = bool(cfg.get("attention_bias", False))
    return dict(
        common,
        qkv_bias=bias, o_bias=bias,
        norm_offset=1.0,
        embed_scale=math.sqrt(common["d_model"]),
        qk_norm="head",
        post_norms=True,
        rope={
            FULL: rope_params(cfg, source, max_pos, block=full_block),
            SLIDING: rope_params(cfg, source, max_pos, block=local_block),
        },
        layer_types=list(layer_types),
        sliding_window=cfg.get("sliding_window"),
        attn_multiplier=positive_float(cfg, "query_pre_attn_scalar", source, 256.0) ** -0.5,  # Gemma3TextConfig's default
        # Gemma 3 replaced Gemma 2's attention soft-capping by q/k norms: transformers keeps the config key but never
        # applies it (only the final one), so neither do we.
        attn_softcap=None,
        final_softcap=positive_float(cfg, "final_logit_softcapping", source, None),
    )


def export_config(out: dict, cfg) -> dict:
    out["layer_types"] = list(cfg.layer_types)  # sliding_window_pattern would shift after removal
    return out


FAMILY = Family(model_type="gemma3_text", architecture="Gemma3ForCausalLM", read_config=read_config,
                weights=sandwich_weights, export_config=export_config, tie_default=True, gguf_arch="gemma3")
