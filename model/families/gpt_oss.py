"""gpt-oss (openai/gpt-oss-20b, gpt-oss-120b): Llama-style pre-norm blocks whose every MLP is a mixture of experts, with

- attention: q/k/v/o with biases (`attention_bias`), GQA, explicit `head_dim`, learned per-head attention sinks
  (`self_attn.sinks` [head], one extra softmax column that is dropped: DecoderConfig.attn_sinks), layers alternating
  `sliding_attention` (window `sliding_window`, 128) and `full_attention` (`layer_types`), YaRN RoPE (rope_theta
  150000, factor 32 over 4096 positions, truncate false: transformers' defaults when the config leaves them out);
- router: a linear WITH bias; top-k of its logits, then softmax over the k chosen in the logits' dtype
  (DecoderConfig.topk_then_softmax);
- experts: `num_local_experts` of `intermediate_size`, with biases, clamped SwiGLU (gate.clamp(max=limit),
  up.clamp(-limit, limit), (up + 1) * gate * sigmoid(alpha gate); `swiglu_limit` 7.0, `swiglu_alpha` 1.702);
- RMSNorm whose weight multiplies in float32 before the cast (norm_wide_gain).

Checkpoints fuse the experts, transposed ([in, out] per expert) and with gate and up INTERLEAVED along the last dim:
`mlp.experts.gate_up_proj` [E, hidden, 2I] (gate = [..., ::2], up = [..., 1::2]), `gate_up_proj_bias` [E, 2I],
`down_proj` [E, I, hidden], `down_proj_bias` [E, hidden]; `InterleavedExperts` splits them on load and fuses them again
on export (so transformers reloads pruned models). The released checkpoints store the expert matrices as MXFP4
(`*_blocks` / `*_scales` with a `quantization_config`), which residscope does not read: it refuses them in one line
(dequantize to bf16 with transformers first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..hf_config import FULL, SLIDING, positive_float, positive_int, rope_params
from .base import Family, Packed
from .llama import llama_weights

# transformers' GptOssConfig defaults (configuration_gpt_oss.py)
DEFAULT_THETA = 150000.0
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}


@dataclass(frozen=True)
class InterleavedExperts(Packed):
    """One gpt-oss fused expert tensor [E, ...]: per expert a matrix stored [in, out] (`transpose`; biases are 1-D per
    expert) holding `per_expert` parameters, interleaved along the last dim when 2 (gate at even, up at odd columns).
    `parts`: the experts' parameters in expert order (gate_0, up_0, gate_1, ...). Split on load, merged on export."""

    per_expert: int = 1

    def split(self, tensor: torch.Tensor, shapes: list[torch.Size], n_heads: int) -> list[torch.Tensor]:
        n = len(self.parts) // self.per_expert
        if tensor.shape[0] != n or tensor.dim() != len(shapes[0]) + 1:
            raise RuntimeError(f"expected {n} experts along dim 0, got shape {tuple(tensor.shape)}")
        out = []
        for e in range(n):
            x = tensor[e]  # [in, out * per_expert] or [out * per_expert]
            pieces = [x[..., j::self.per_expert] for j in range(self.per_expert)]
            out += [(p.T if self.transpose and p.dim() == 2 else p).contiguous() for p in pieces]
        return out

    def merge(self, tensors: list[torch.Tensor], n_heads: int) -> torch.Tensor:
        n = len(tensors) // self.per_expert
        experts = []
        for e in range(n):
            pieces = [t.T if self.transpose and t.dim() == 2 else t for t in tensors[e * self.per_expert:(e + 1) * self.per_expert]]
            experts.append(torch.stack(pieces, dim=-1).flatten(-2) if self.per_expert > 1 else pieces[0])
        return torch.stack(experts)


def expert_rules(n_experts: int) -> dict:
    """Block rules of the four fused expert tensors."""
    def parts(projs: tuple[str, ...], kind: str) -> tuple[str, ...]:
        return tuple(f"mlp.experts.{e}.{p}.{kind}" for e in range(n_experts) for p in projs)

    gate_up, down = ("gate_proj", "up_proj"), ("down_proj",)
    return {
        "mlp.experts.gate_up_proj": InterleavedExperts(parts(gate_up, "weight"), transpose=True, per_expert=2),
        "mlp.experts.gate_up_proj_bias": InterleavedExperts(parts(gate_up, "bias"), per_expert=2),
        "mlp.experts.down_proj": InterleavedExperts(parts(down, "weight"), transpose=True),
        "mlp.experts.down_proj_bias": InterleavedExperts(parts(down, "bias")),
    }


def weights(cfg):
    rules = {"self_attn.sinks": "attn.sinks", "mlp.router.weight": "mlp.router.weight",
             "mlp.router.bias": "mlp.router.bias", **expert_rules(cfg.n_experts)}
    return llama_weights(cfg, block=rules)


def rope_block(cfg: dict) -> dict:
    """The RoPE parameters transformers' GptOssConfig ends up with: the config's block (rope_parameters or legacy
    rope_scaling), else YaRN x32 over 4096; rope_theta from the block, the top level, else 150000."""
    block = {**(cfg.get("rope_parameters") or {}), **(cfg.get("rope_scaling") or {})} or dict(DEFAULT_ROPE)
    if block.get("rope_theta") is None:
        block["rope_theta"] = cfg["rope_theta"] if cfg.get("rope_theta") is not None else DEFAULT_THETA
    return block


def read_config(cfg: dict, common: dict, source: str) -> dict:
    n_layers = common["n_layers"]
    n_experts = positive_int(cfg, "num_local_experts", source, 128)  # num_experts is renamed to it (FAMILY.aliases)
    k = positive_int(cfg, "num_experts_per_tok", source, 4)
    if k > n_experts:
        raise ConfigError(f"{source}: num_experts_per_tok {k} > num_local_experts {n_experts}")
    window = positive_int(cfg, "sliding_window", source, 128) if "sliding_window" not in cfg or cfg["sliding_window"] is not None else None
    types = cfg.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(n_layers)]
    if not isinstance(types, list) or any(t not in (SLIDING, FULL) for t in types):
        raise ConfigError(f"{source}: layer_types must list {SLIDING!r} / {FULL!r} per layer, got {types!r}")
    rope = rope_params(cfg, source, common["max_position_embeddings"], block=rope_block(cfg))
    bias = bool(cfg.get("attention_bias", True))
    return dict(common, qkv_bias=bias, o_bias=bias, norm_wide_gain=True, attn_sinks=True, layer_types=list(types),
                sliding_window=window, rope={t: rope for t in set(types)},
                n_experts=n_experts, experts_per_tok=k, d_expert=common["d_mlp"], norm_topk_prob=True,
                topk_then_softmax=True, router_bias=True, expert_bias=True,
                swiglu_limit=positive_float(cfg, "swiglu_limit", source, 7.0),
                swiglu_alpha=positive_float(cfg, "swiglu_alpha", source, 1.702),
                sparse_layers=tuple(range(n_layers)))


def export_config(out: dict, cfg) -> dict:
    """Expert count after expert pruning; explicit layer types (the default alternation would shift after layer
    removal)."""
    out["num_local_experts"] = cfg.n_experts
    out.pop("num_experts", None)  # transformers' alias of num_local_experts: one count only
    out["layer_types"] = list(cfg.layer_types)
    return out


FAMILY = Family(model_type="gpt_oss", architecture="GptOssForCausalLM", read_config=read_config, weights=weights,
                prepend_bos=False, export_config=export_config,
                aliases={"num_experts": "num_local_experts"},  # GptOssConfig.attribute_map
                quantization_note="gpt-oss's MXFP4 expert weights (*_blocks / *_scales) are not read; dequantize to "
                                  "bf16 with transformers first (GptOssForCausalLM.from_pretrained(path, "
                                  "quantization_config=Mxfp4Config(dequantize=True)), then save_pretrained)")
