"""Mistral: Llama with `sliding_window` on every layer (None: full attention)."""

from __future__ import annotations

from ..hf_config import llama_layout
from .base import Family
from .llama import llama_weights


def read_config(cfg: dict, common: dict, source: str) -> dict:
    return llama_layout(cfg, common, source, window=cfg.get("sliding_window"))


FAMILY = Family(model_type="mistral", architecture="MistralForCausalLM", read_config=read_config,
                weights=llama_weights, gguf_arch="llama")
