"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2 attention (q/k/v bias) with mixture-of-experts MLPs
(model/moe.py): `num_experts` SwiGLU experts of `moe_intermediate_size`, top `num_experts_per_tok`, renormalised when
`norm_topk_prob`, and a shared expert of `shared_expert_intermediate_size` scaled by sigmoid(shared_expert_gate(x)).
Layer i is sparse iff i not in `mlp_only_layers`, num_experts > 0 and (i + 1) % decoder_sparse_step == 0; dense layers
use `intermediate_size`.

Checkpoints store experts one by one (`mlp.experts.{e}.gate_proj.weight`, what transformers writes) or fused
(`mlp.experts.gate_up_proj` [E, 2 x moe_intermediate, hidden], rows [gate; up], and `mlp.experts.down_proj`
[E, hidden, moe_intermediate], transformers 5's in-memory layout); both load, export writes one by one. The shared
helpers here serve the other MoE families (qwen3_moe, mixtral, olmoe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..hf_config import FULL, SLIDING, positive_int, rope_params
from .base import Family, Packed
from .llama import llama_weights


@dataclass(frozen=True)
class ExpertStack(Packed):
    """A 3-D checkpoint tensor holding one matrix (or a [gate; up] pair) per expert: `parts` are the experts' parameters
    in expert order (gate_0, up_0, gate_1, up_1, ... for a pair). Loading only: export writes experts one by one."""

    per_expert: int = 1  # matrices per expert in the tensor (2: gate and up stacked along rows)
    load_only: bool = True

    def split(self, tensor: torch.Tensor, shapes: list[torch.Size], n_heads: int) -> list[torch.Tensor]:
        n = len(self.parts) // self.per_expert
        if tensor.dim() != 3 or tensor.shape[0] != n:
            raise RuntimeError(f"expected {n} experts along dim 0, got shape {tuple(tensor.shape)}")
        sizes = [s[0] for s in shapes[: self.per_expert]]
        return [part for e in range(n) for part in torch.split(tensor[e], sizes, dim=0)]

    def merge(self, tensors: list[torch.Tensor], n_heads: int) -> torch.Tensor:
        n = len(tensors) // self.per_expert
        return torch.stack([torch.cat(tensors[e * self.per_expert:(e + 1) * self.per_expert]) for e in range(n)])


def expert_names(n_experts: int, ckpt: dict[str, str], fused: dict[str, tuple[str, ...]]) -> dict:
    """Block rules for the routed experts: `ckpt` maps residscope's projection name (gate_proj / up_proj / down_proj)
    to the checkpoint's per-expert name, `fused` a fused tensor's suffix to the projections it stacks."""
    rules: dict = {}
    for e in range(n_experts):
        for ours, theirs in ckpt.items():
            rules[f"experts.{e}.{theirs}.weight"] = f"mlp.experts.{e}.{ours}.weight"
    for suffix, projs in fused.items():
        parts = tuple(f"mlp.experts.{e}.{p}.weight" for e in range(n_experts) for p in projs)
        rules[suffix] = ExpertStack(parts, per_expert=len(projs))
    return rules


QWEN_EXPERTS = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
FUSED_EXPERTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def moe_block_rules(cfg, prefix: str = "mlp.", experts: dict = QWEN_EXPERTS, router: str = "gate") -> dict:
    """Router, routed experts (per expert and fused) and shared expert of a Qwen-style MoE layer."""
    rules = {f"{prefix}{router}.weight": "mlp.router.weight", f"{prefix}{router}.bias": "mlp.router.bias"}
    rules.update({f"{prefix}{k}": v for k, v in expert_names(cfg.n_experts, experts, {}).items()})
    rules.update({f"mlp.{k}": v for k, v in expert_names(cfg.n_experts, {}, {
        f"experts.{s}": p for s, p in FUSED_EXPERTS.items()}).items()})
    for p in ("gate_proj", "up_proj", "down_proj"):
        rules[f"mlp.shared_expert.{p}.weight"] = f"mlp.shared_expert.{p}.weight"
    rules["mlp.shared_expert_gate.weight"] = "mlp.shared_expert_gate.weight"
    return rules


def weights(cfg):
    return llama_weights(cfg, block=moe_block_rules(cfg))


def count(cfg: dict, key: str, source: str, default: int = 0) -> int:
    """A non-negative integer config key (num_experts may be 0: a dense model)."""
    value = cfg.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{source}: {key} must be an integer >= 0, got {value!r}")
    return value


def moe_fields(cfg: dict, common: dict, source: str, *, shared: bool, norm_default: bool,
               experts_key: str = "num_experts") -> dict:
    """The DecoderConfig mixture-of-experts fields of a Qwen-style config (decoder_sparse_step, mlp_only_layers)."""
    n_layers = common["n_layers"]
    n_experts = count(cfg, experts_key, source)
    k = positive_int(cfg, "num_experts_per_tok", source, 1)
    step = positive_int(cfg, "decoder_sparse_step", source, 1)
    dense = cfg.get("mlp_only_layers") or []
    if not isinstance(dense, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in dense):
        raise ConfigError(f"{source}: mlp_only_layers must be a list of layer indices, got {dense!r}")
    sparse = [i for i in range(n_layers) if n_experts > 0 and i not in dense and (i + 1) % step == 0]
    if sparse and k > n_experts:
        raise ConfigError(f"{source}: num_experts_per_tok {k} > {experts_key} {n_experts}")
    fields = dict(n_experts=n_experts, experts_per_tok=k, sparse_layers=tuple(sparse),
                  norm_topk_prob=bool(cfg.get("norm_topk_prob", norm_default)))
    if sparse:
        fields["d_expert"] = positive_int(cfg, "moe_intermediate_size", source, required=True)
    if shared and sparse:
        fields["d_shared_expert"] = count(cfg, "shared_expert_intermediate_size", source)
    return fields


def layer_types(cfg: dict, n_layers: int) -> tuple[list[str], int | None]:
    """Qwen2-MoE's default: with use_sliding_window, every other layer below max_window_layers slides."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    if window is None:
        return [FULL] * n_layers, None
    types = cfg.get("layer_types") or [SLIDING if (i + 1) % 2 and i < cfg.get("max_window_layers", 28) else FULL
                                       for i in range(n_layers)]
    return list(types), window


def read_config(cfg: dict, common: dict, source: str) -> dict:
    types, window = layer_types(cfg, common["n_layers"])
    return dict(common, qkv_bias=bool(cfg.get("qkv_bias", True)), o_bias=False, layer_types=types,
                sliding_window=window,
                rope={t: rope_params(cfg, source, common["max_position_embeddings"]) for t in set(types)},
                **moe_fields(cfg, common, source, shared=True, norm_default=False))


def export_config(out: dict, cfg) -> dict:
    """After surgery: explicit layer types, the sparse layers as mlp_only_layers (layer removal shifts the step
    pattern), and the experts left after expert pruning."""
    out["layer_types"] = list(cfg.layer_types)
    out["num_local_experts" if "num_local_experts" in out else "num_experts"] = cfg.n_experts  # as the family reads it
    out["decoder_sparse_step"] = 1
    out["mlp_only_layers"] = [i for i in range(cfg.n_layers) if i not in cfg.sparse_layers]
    return out


FAMILY = Family(model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM", read_config=read_config, weights=weights,
                prepend_bos=False, export_config=export_config)
