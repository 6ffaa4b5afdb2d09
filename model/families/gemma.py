"""Gemma (1): Llama with (1 + w) RMSNorms, embeddings x sqrt(d_model) (rounded to the model dtype, like transformers'
buffer), GeGLU (tanh GELU: transformers reads the legacy `hidden_act: "gelu"` of the released configs as the tanh
approximation) and a head_dim independent of d_model (256 when config.json leaves it out); tied embeddings."""

from __future__ import annotations

import math

from ..hf_config import FULL, activation, positive_int, rope_params
from .base import Family
from .llama import llama_weights


def gemma_activation(cfg: dict, source: str, key: str) -> str:
    """GemmaConfig turns hidden_act "gelu" into "gelu_pytorch_tanh" (the released checkpoints say "gelu" but were
    trained with the tanh form)."""
    if cfg.get(key) == "gelu":
        return "gelu_tanh"
    return activation(cfg, source, key, "gelu_pytorch_tanh")


def read_config(cfg: dict, common: dict, source: str) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    return dict(common, act=gemma_activation(cfg, source, "hidden_act"), d_head=positive_int(cfg, "head_dim", source, 256),
                qkv_bias=bias, o_bias=bias, norm_offset=1.0, embed_scale=math.sqrt(common["d_model"]),
                rope={FULL: rope_params(cfg, source, common["max_position_embeddings"])})


def weights(cfg):
    return llama_weights(cfg, ignored=(r"^model\.embed_tokens\.embed_scale$",))


FAMILY = Family(model_type="gemma", architecture="GemmaForCausalLM", read_config=read_config, weights=weights,
                tie_default=True, gguf_arch="gemma")
