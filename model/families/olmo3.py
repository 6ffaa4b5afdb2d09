"""OLMo 3: OLMo 2 (post-norms only, q/k norms over the full projection, float32 gain and RoPE) with sliding and full
attention layers (`layer_types`; by default three sliding layers, then one full), each layer type with its own RoPE
parameters (`rope_parameters: {"full_attention": {...}, "sliding_attention": {...}}`)."""

from __future__ import annotations

from ..hf_config import FULL, SLIDING, positive_int, rope_params
from .base import Family
from .olmo2 import olmo_fields, weights
from .qwen2 import export_config

DEFAULT_THETA = 500_000.0  # Olmo3Config.default_theta


def rope_blocks(cfg: dict, max_pos: int | None) -> dict[str, dict]:
    """Olmo3Config's reading of the RoPE keys, per layer type. Only the per-type entries of rope_parameters count; a
    legacy rope_scaling updates the full-attention layers; a legacy top-level rope_theta sets the full-attention base
    only (transformers pops it before the sliding layers read it: they keep the default 500000)."""
    given = cfg.get("rope_parameters") or {}
    blocks = {t: dict(given.get(t) or {"rope_type": "default"}) for t in (FULL, SLIDING)}
    if cfg.get("rope_scaling"):
        blocks[FULL].update(cfg["rope_scaling"])
    blocks[FULL].setdefault("rope_theta", cfg["rope_theta"] if cfg.get("rope_theta") is not None else DEFAULT_THETA)
    blocks[SLIDING].setdefault("rope_theta", DEFAULT_THETA)
    for block in blocks.values():
        if block.get("rope_type", block.get("type")) in ("llama3", "yarn", "longrope"):
            block.setdefault("original_max_position_embeddings", max_pos)
    return blocks


def read_config(cfg: dict, common: dict, source: str) -> dict:
    n_layers, max_pos = common["n_layers"], common["max_position_embeddings"]
    layer_types = cfg.get("layer_types") or [SLIDING if (i + 1) % 4 else FULL for i in range(n_layers)]
    blocks = rope_blocks(cfg, max_pos)
    return dict(olmo_fields(cfg, common, source), layer_types=list(layer_types),
                sliding_window=positive_int(cfg, "sliding_window", source) if "sliding_window" in cfg else 4096,
                rope={t: rope_params(cfg, source, max_pos, block=blocks[t]) for t in set(layer_types)})


FAMILY = Family(model_type="olmo3", architecture="Olmo3ForCausalLM", read_config=read_config, weights=weights,
                export_config=export_config)
