"""Qwen2 / Qwen2.5: q/k/v biases (o none); with `use_sliding_window`, layers from `max_window_layers` on slide.
Trained without a BOS token in front (TransformerLens's default_prepend_bos=False)."""

from __future__ import annotations

from ..hf_config import FULL, SLIDING, rope_params
from .base import Family
from .llama import llama_weights


def sliding_layer_types(cfg: dict, n_layers: int) -> tuple[list[str], int | None]:
    """(layer_types, window) of a Qwen-style config: explicit layer_types, else sliding from max_window_layers on."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    if window is None:
        return [FULL] * n_layers, None
    layer_types = cfg.get("layer_types") or [
        SLIDING if i >= cfg.get("max_window_layers", n_layers) else FULL for i in range(n_layers)]
    return list(layer_types), window


def read_config(cfg: dict, common: dict, source: str) -> dict:
    layer_types, window = sliding_layer_types(cfg, common["n_layers"])
    return dict(common, qkv_bias=True, o_bias=False, layer_types=layer_types, sliding_window=window,
                rope={t: rope_params(cfg, source, common["max_position_embeddings"]) for t in set(layer_types)})


def export_config(out: dict, cfg) -> dict:
    out["layer_types"] = list(cfg.layer_types)  # max_window_layers would shift after removal
    return out


FAMILY = Family(model_type="qwen2", architecture="Qwen2ForCausalLM", read_config=read_config, weights=llama_weights,
                prepend_bos=False, export_config=export_config, gguf_arch="qwen2")
