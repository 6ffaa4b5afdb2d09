"""Baichuan 2: fused W_pack (rows [q; k; v]), NormHead (unit-norm lm_head rows), no GQA; RoPE when the config has
max_position_embeddings (7B), ALiBi when it has only model_max_length (13B)."""

from __future__ import annotations

from ..errors import ConfigError
from ..hf_config import FULL, rope_params
from .base import Family
from .llama import FUSED_QKV, llama_weights


def weights(cfg):
    return llama_weights(cfg, block={"self_attn.W_pack.weight": FUSED_QKV})


def read_config(cfg: dict, common: dict, source: str, position_embedding: str | None = None) -> dict:
    if position_embedding is None:
        position_embedding = "rope" if cfg.get("max_position_embeddings") is not None else "alibi"
    if position_embedding not in ("rope", "alibi"):
        raise ConfigError(f"position_embedding must be 'rope' or 'alibi', got {position_embedding!r}")
    if common["n_kv_heads"] != common["n_heads"]:
        raise ConfigError(f"{source}: baichuan has no grouped-query attention (num_key_value_heads)")
    max_pos = cfg.get("max_position_embeddings") or cfg.get("model_max_length")
    common = {**common, "max_position_embeddings": max_pos}
    rope = {FULL: rope_params(cfg, source, max_pos)} if position_embedding == "rope" else {}
    return dict(common, norm_head=True, positional=position_embedding, rope=rope)


FAMILY = Family(model_type="baichuan", architecture="BaichuanForCausalLM", read_config=read_config, weights=weights)
