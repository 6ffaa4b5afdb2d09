"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): Qwen3 attention (RMSNorm of q and k per head, explicit head_dim, no biases
unless attention_bias; with use_sliding_window every layer slides) and Qwen2-MoE's sparse MLPs without a shared expert
(model/families/qwen2_moe.py)."""

from __future__ import annotations

from ..hf_config import FULL, SLIDING, rope_params
from .base import Family
from .llama import llama_weights
from .qwen2_moe import export_config, moe_block_rules, moe_fields


def weights(cfg):
    return llama_weights(cfg, block=moe_block_rules(cfg))


def read_config(cfg: dict, common: dict, source: str) -> dict:
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    types = [SLIDING if window else FULL] * common["n_layers"]
    bias = bool(cfg.get("attention_bias", False))
    return dict(common, qkv_bias=bias, o_bias=bias, qk_norm="head", layer_types=types, sliding_window=window,
                rope={t: rope_params(cfg, source, common["max_position_embeddings"]) for t in set(types)},
                **moe_fields(cfg, common, source, shared=False, norm_default=False, experts_key="num_local_experts"))


FAMILY = Family(model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", read_config=read_config, weights=weights,
                prepend_bos=False, export_config=export_config,
                # Qwen3MoeConfig.attribute_map: Qwen's config.json says num_experts, transformers 5 saves num_local_experts
                aliases={"num_experts": "num_local_experts"})
