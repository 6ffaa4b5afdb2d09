"""Granite (IBM Granite 3.x): Llama with four multipliers. Embeddings x `embedding_multiplier` (a Python float, not
rounded to the model dtype first), attention scores x `attention_multiplier` in place of 1/sqrt(head_dim), each half's
output x `residual_multiplier` before the residual add, logits / `logits_scaling`. Trained without a BOS token in
front (TransformerLens's default_prepend_bos=False)."""

from __future__ import annotations

from ..hf_config import llama_layout, positive_float
from .base import Family
from .llama import llama_weights


def multiplier(cfg: dict, key: str, source: str) -> float | None:
    """GraniteConfig's multiplier (default 1), or None where it is 1 (nothing to compute)."""
    value = positive_float(cfg, key, source, 1.0)
    return None if value == 1.0 else value


def read_config(cfg: dict, common: dict, source: str) -> dict:
    return dict(llama_layout(cfg, common, source),
                embed_scale=multiplier(cfg, "embedding_multiplier", source), embed_scale_rounded=False,
                attn_multiplier=positive_float(cfg, "attention_multiplier", source, 1.0),
                residual_scale=multiplier(cfg, "residual_multiplier", source),
                logit_divisor=multiplier(cfg, "logits_scaling", source))


FAMILY = Family(model_type="granite", architecture="GraniteForCausalLM", read_config=read_config, weights=llama_weights,
                prepend_bos=False)
