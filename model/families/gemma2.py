"""Gemma 2: Gemma's (1 + w) RMSNorms, scaled embeddings and GeGLU, with four norms per block (before and after attention
and the MLP), attention-logit soft-capping tanh(s / cap) * cap (`attn_logit_softcapping`), final-logit soft-capping
(`final_logit_softcapping`), scores scaled by query_pre_attn_scalar^-1/2 instead of head_dim^-1/2, and alternating
sliding (even layers) / global layers sharing one RoPE. A key left out of config.json takes Gemma2Config's default."""

from __future__ import annotations

import math

from ..hf_config import FULL, SLIDING, activation, positive_float, positive_int, rope_params
from .base import Family
from .gemma3_text import export_config, sandwich_weights


def optional_positive(cfg: dict, key: str, source: str, default: float) -> float | None:
    """A soft-cap: the config class default when the key is absent, None (off) when it is null."""
    return positive_float(cfg, key, source, None) if key in cfg else default


def read_config(cfg: dict, common: dict, source: str) -> dict:
    n_layers = common["n_layers"]
    layer_types = cfg.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(n_layers)]
    bias = bool(cfg.get("attention_bias", False))
    return dict(
        common,
        act=activation(cfg, source, "hidden_activation", "gelu_pytorch_tanh"),  # no "gelu" -> tanh rewrite here
        d_head=positive_int(cfg, "head_dim", source, 256),
        qkv_bias=bias, o_bias=bias,
        norm_offset=1.0,
        embed_scale=math.sqrt(common["d_model"]),
        post_norms=True,
        layer_types=list(layer_types),
        sliding_window=positive_int(cfg, "sliding_window", source) if "sliding_window" in cfg else 4096,
        rope={t: rope_params(cfg, source, common["max_position_embeddings"]) for t in set(layer_types)},
        attn_multiplier=positive_float(cfg, "query_pre_attn_scalar", source, 256.0) ** -0.5,
        attn_softcap=optional_positive(cfg, "attn_logit_softcapping", source, 50.0),
        final_softcap=optional_positive(cfg, "final_logit_softcapping", source, 30.0),
    )


FAMILY = Family(model_type="gemma2", architecture="Gemma2ForCausalLM", read_config=read_config,
                weights=sandwich_weights, export_config=export_config, tie_default=True, gguf_arch="gemma2")
