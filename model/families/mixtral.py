"""Mixtral: Mistral attention (sliding_window on every layer when set) with `num_local_experts` SwiGLU experts of
`intermediate_size`, top-2, always renormalised, routing weights kept in float32 until they scale an expert's output.

Checkpoints: `block_sparse_moe.experts.{e}.w1 / w3 / w2` (gate / up / down; what transformers writes) or transformers 5's
in-memory `mlp.experts.gate_up_proj` / `down_proj` and `mlp.gate`."""

from __future__ import annotations

from ..errors import ConfigError
from ..hf_config import FULL, SLIDING, positive_int, rope_params
from .base import Family
from .llama import llama_weights
from .qwen2_moe import moe_block_rules

MIXTRAL_EXPERTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def weights(cfg):
    rules = moe_block_rules(cfg, prefix="block_sparse_moe.", experts=MIXTRAL_EXPERTS)
    rules.update({"mlp.gate.weight": "mlp.router.weight"})
    return llama_weights(cfg, block=rules)


def read_config(cfg: dict, common: dict, source: str) -> dict:
    n_experts = positive_int(cfg, "num_local_experts", source, 8)
    k = positive_int(cfg, "num_experts_per_tok", source, 2)
    if k > n_experts:
        raise ConfigError(f"{source}: num_experts_per_tok {k} > num_local_experts {n_experts}")
    window = cfg.get("sliding_window")
    types = [SLIDING if window else FULL] * common["n_layers"]
    return dict(common, layer_types=types, sliding_window=window,
                rope={t: rope_params(cfg, source, common["max_position_embeddings"]) for t in set(types)},
                n_experts=n_experts, experts_per_tok=k, d_expert=common["d_mlp"], norm_topk_prob=True,
                routing_fp32=True, sparse_layers=tuple(range(common["n_layers"])))


def export_config(out: dict, cfg) -> dict:
    out["num_local_experts"] = cfg.n_experts
    return out


FAMILY = Family(model_type="mixtral", architecture="MixtralForCausalLM", read_config=read_config, weights=weights,
                export_config=export_config, aliases={"num_experts": "num_local_experts"})  # MixtralConfig.attribute_map
