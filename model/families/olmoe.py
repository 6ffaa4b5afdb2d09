"""OLMoE: OLMo attention (RMSNorm over the whole q and k projections, before the split into heads) with a sparse MLP on
every layer: `num_experts` SwiGLU experts of `intermediate_size`, top `num_experts_per_tok`, renormalised when
`norm_topk_prob`, no shared expert. `clip_qkv` (clamping q/k/v) is refused: no released OLMoE sets it."""

from __future__ import annotations

from ..errors import ConfigError
from ..hf_config import FULL, positive_int, rope_params
from .base import Family
from .llama import llama_weights
from .qwen2_moe import moe_block_rules


def weights(cfg):
    return llama_weights(cfg, block=moe_block_rules(cfg))


def read_config(cfg: dict, common: dict, source: str) -> dict:
    if cfg.get("clip_qkv") is not None:
        raise ConfigError(f"{source}: unsupported option clip_qkv={cfg['clip_qkv']!r}")
    n_experts = positive_int(cfg, "num_experts", source, 64)
    k = positive_int(cfg, "num_experts_per_tok", source, 8)
    if k > n_experts:
        raise ConfigError(f"{source}: num_experts_per_tok {k} > num_experts {n_experts}")
    bias = bool(cfg.get("attention_bias", False))
    return dict(common, qkv_bias=bias, o_bias=bias, qk_norm="full", layer_types=[FULL] * common["n_layers"],
                rope={FULL: rope_params(cfg, source, common["max_position_embeddings"])},
                n_experts=n_experts, experts_per_tok=k, d_expert=common["d_mlp"],
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), sparse_layers=tuple(range(common["n_layers"])))


def export_config(out: dict, cfg) -> dict:
    out["num_experts"] = cfg.n_experts
    return out


FAMILY = Family(model_type="olmoe", architecture="OlmoeForCausalLM", read_config=read_config, weights=weights,
                export_config=export_config, aliases={"num_local_experts": "num_experts"})  # OlmoeConfig.attribute_map
