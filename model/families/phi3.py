"""Phi-3 (and Phi-3.5 / Phi-4-mini): Llama with a fused `qkv_proj` (rows [q; k; v], GQA-sized) and `gate_up_proj`
(rows [gate; up]), optional partial rotary (`partial_rotary_factor`: the first fraction of each head rotates), LongRoPE
(short factors up to `original_max_position_embeddings`, long ones beyond, chosen by the current length, and the
attention factor sqrt(1 + ln(factor) / ln(original length))), and one `sliding_window` on every layer."""

from __future__ import annotations

from ..errors import ConfigError
from ..hf_config import FULL, SLIDING, positive_float, positive_int, rope_params
from .base import Family
from .llama import FUSED_GATE_UP, FUSED_QKV, llama_weights


def rope_block(cfg: dict) -> dict:
    """Phi3Config's reading: rope_scaling (legacy) or rope_parameters; "su" and "yarn" are its old names for longrope;
    for longrope, the top-level original_max_position_embeddings (default 4096) wins over the block's."""
    block = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    kind = block.pop("type", None)
    kind = block.get("rope_type", kind) or "default"
    block["rope_type"] = "longrope" if kind in ("su", "yarn") else kind
    if block["rope_type"] == "longrope":
        block["original_max_position_embeddings"] = cfg.get("original_max_position_embeddings", 4096)
    return block


def read_config(cfg: dict, common: dict, source: str) -> dict:
    block = rope_block(cfg)
    if block["rope_type"] not in ("default", "longrope"):  # Phi3Config.validate_rope refuses the others too
        raise ConfigError(f"{source}: unsupported rope_type {block['rope_type']!r} for phi3 (default or longrope)")
    partial = block.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    window = positive_int(cfg, "sliding_window", source)
    layer_types = [SLIDING if window else FULL] * common["n_layers"]
    return dict(common, norm_eps=positive_float(cfg, "rms_norm_eps", source, 1e-5),
                max_position_embeddings=positive_int(cfg, "max_position_embeddings", source, 4096),
                layer_types=layer_types, sliding_window=window,
                rope={layer_types[0]: rope_params(cfg, source, common["max_position_embeddings"] or 4096, block=block,
                                                  partial=partial)})


def weights(cfg):
    return llama_weights(cfg, block={"self_attn.qkv_proj.weight": FUSED_QKV, "mlp.gate_up_proj.weight": FUSED_GATE_UP})


FAMILY = Family(model_type="phi3", architecture="Phi3ForCausalLM", read_config=read_config, weights=weights,
                gguf_arch="phi3")
