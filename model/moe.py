"""Mixture-of-experts MLP (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, gpt-oss): a router picks k of E SwiGLU experts per
token, and an optional shared expert, scaled by a sigmoid gate, runs on every token.

    logits  = x W_router^T (+ b)                               hook_router_logits   [batch, pos, n_experts]
    probs   = softmax(logits) in float32 (float64 for float64 models)
    idx     = top-k(probs)                                     hook_expert_indices  [batch, pos, k]
    w       = probs[idx] (/ their sum when norm_topk_prob)     hook_expert_weights  [batch, pos, k]
    out     = sum_j w_j expert_{idx_j}(x) + sigmoid(x W_sg^T) shared(x)     hook_shared_gate [batch, pos, 1]

gpt-oss (`topk_then_softmax`) takes the top-k of the logits first and softmaxes the k chosen logits in their own dtype
(the same weights as renormalised top-k probabilities, rounded as transformers rounds them); its router and experts
have biases, and its experts apply the clamped SwiGLU `clamped_swiglu` (`swiglu_limit`).

This is transformers' arithmetic step for step (softmax in float32, weights cast to the model dtype before they scale an
expert's output, except Mixtral's which stay float32), so logits match it. The forward groups the routed (token, slot)
pairs by expert with one sort and runs each expert only on its tokens: nothing is computed for experts nobody chose.

Patching `hook_expert_indices` forces experts: the weights are then read from the router's probabilities at the patched
indices (renormalised when the family renormalises), so a forced expert gets the weight the router gives it. Opt-in
(`Decoder.set_use_expert_outputs(True)`): `experts.{e}.hook_out` [batch, pos, d_model], expert e's weighted output (zero
where it was not chosen), and `hook_shared_out`, the gated shared expert's output; they sum to the MLP output, and a
patched value is what gets added. `skip_ratio` (Lu et al.'s dynamic skipping) is a run-time switch: slot j > 0 is dropped
when its weight is below skip_ratio x the top slot's weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

from .config import DecoderConfig
from .decoder import ACTIVATIONS, hooked
from .errors import InputError
from .tl_weights import MLPWeights


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss's expert activation, step for step as transformers' GptOssExperts._apply_gate: the gate clamped from
    above, the linear branch on both sides, a sigmoid of gain alpha, and the linear branch offset by 1."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class Expert(MLPWeights, nn.Module):
    """One SwiGLU expert down(act(gate(x)) * up(x)), or with `limit` gpt-oss's down(clamped_swiglu(gate(x), up(x)));
    TransformerLens' W_in / W_gate / W_out (and b_*) come from MLPWeights."""

    gated = True  # MLPWeights' W_gate / b_gate

    def __init__(self, d_model: int, d_mlp: int, act: str, bias: bool = False, limit: float | None = None,
                 alpha: float = 1.702):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.up_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=bias)
        self.act = ACTIVATIONS[act]
        self.limit, self.alpha = limit, alpha
        self.hook_out = HookPoint()  # [batch, pos, d_model], weighted output; with use_expert_outputs only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_model] -> [..., d_model]."""
        gate, up = unfused_linear(self.gate_proj, x), unfused_linear(self.up_proj, x)  # [..., d_mlp] each
        if self.limit is None:
            return unfused_linear(self.down_proj, self.act(gate) * up)
        return unfused_linear(self.down_proj, clamped_swiglu(gate, up, self.limit, self.alpha))


def unfused_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x W^T, then + b as a separate step: transformers' fused experts (gpt-oss) add their biases after the matmul, which
    rounds differently from one addmm in half precision; without a bias this is the plain product."""
    out = F.linear(x, layer.weight)
    return out if layer.bias is None else out + layer.bias


def top_k_routing(logits: torch.Tensor, k: int, *, topk_then_softmax: bool, renormalise: bool,
                  forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert indices [..., k], weights [..., k]) from router logits [..., n_experts], before any cast to the model
    dtype. `forced`: indices to use instead of the top k (a patched hook_expert_indices); their weights are what the
    router gives them. topk_then_softmax (gpt-oss): top-k of the logits, softmax over the k in the logits' dtype."""
    if topk_then_softmax:
        idx = logits.topk(k, dim=-1).indices if forced is None else forced  # [..., k]
        chosen = logits.gather(-1, idx)  # [..., k], in descending order unless forced
        return idx, chosen.softmax(-1, dtype=chosen.dtype)
    probs = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))  # [..., n_experts]
    if forced is None:
        top, idx = probs.topk(k, dim=-1)  # [..., k]
    else:
        idx, top = forced, probs.gather(-1, forced)
    return idx, (top / top.sum(-1, keepdim=True) if renormalise else top)


class MoE(nn.Module):
    """A sparse MLP layer; see the module docstring. Scalars are copied from the config so the layer survives surgery."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.experts_per_tok
        self.norm_topk_prob, self.routing_fp32 = cfg.norm_topk_prob, cfg.routing_fp32
        self.topk_then_softmax = cfg.topk_then_softmax
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=cfg.router_bias)
        self.experts = nn.ModuleList(Expert(cfg.d_model, cfg.d_expert, cfg.act, cfg.expert_bias, cfg.swiglu_limit,
                                            cfg.swiglu_alpha) for _ in range(cfg.n_experts))
        if cfg.d_shared_expert:
            self.shared_expert = Expert(cfg.d_model, cfg.d_shared_expert, cfg.act)
            self.shared_expert_gate = nn.Linear(cfg.d_model, 1, bias=False)
        self.skip_ratio: float | None = None  # dynamic skipping (run-time switch, see set_skip_ratio)
        self.use_expert_outputs = False  # kept in step by Decoder.set_use_expert_outputs
        self.hook_router_logits = HookPoint()  # [batch, pos, n_experts]
        self.hook_expert_indices = HookPoint()  # [batch, pos, k]
        self.hook_expert_weights = HookPoint()  # [batch, pos, k]
        self.hook_shared_gate = HookPoint()  # [batch, pos, 1], with a shared expert only
        self.hook_shared_out = HookPoint()  # [batch, pos, d_model], with use_expert_outputs and a shared expert

    @property
    def has_shared_expert(self) -> bool:
        return "shared_expert" in self._modules

    # TransformerLens' MoE name for the router matrix
    @property
    def W_gate(self) -> torch.Tensor:  # [d_model, n_experts]
        return self.router.weight.T

    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [batch, pos, n_experts], indices [batch, pos, k], weights [batch, pos, k]) through the hooks."""
        logits = self.hook_router_logits(self.router(x))  # [batch, pos, n_experts]
        idx, weights = self.weights_of(logits)  # [batch, pos, k] each
        if hooked(self.hook_expert_indices):
            seen = self.hook_expert_indices(idx.clone())
            if not torch.equal(seen, idx):
                idx, weights = self.weights_of(logits, forced=self._check_indices(seen, idx.shape))
        if not self.routing_fp32:
            weights = weights.to(x.dtype)
        return logits, idx, self.hook_expert_weights(weights)

    def weights_of(self, logits: torch.Tensor, forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, weights) [..., k] this layer's routing gives router logits [..., n_experts] (`top_k_routing`)."""
        return top_k_routing(logits, self.top_k, topk_then_softmax=self.topk_then_softmax,
                             renormalise=self.norm_topk_prob, forced=forced)

    def _check_indices(self, idx: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if idx.shape != shape or idx.dtype not in (torch.int64, torch.int32):
            raise InputError(f"hook_expert_indices: a patch must keep shape {tuple(shape)} and an integer dtype, got "
                             f"{tuple(idx.shape)} {idx.dtype}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n_experts):
            raise InputError(f"hook_expert_indices: expert indices must lie in 0..{self.n_experts - 1}")
        return idx.long()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, pos, d_model] -> [batch, pos, d_model]."""
        _, idx, weights = self.routing(x)
        flat = x.reshape(-1, x.shape[-1])  # [tok, d_model]
        out = self._routed(flat, idx.reshape(-1, idx.shape[-1]), weights.reshape(-1, weights.shape[-1]), x.shape)
        if self.has_shared_expert:
            gate = self.hook_shared_gate(torch.sigmoid(self.shared_expert_gate(x)))  # [batch, pos, 1]
            shared = (gate * self.shared_expert(x)).reshape(flat.shape)  # [tok, d_model]
            if self.use_expert_outputs:
                shared = self.hook_shared_out(shared.view(x.shape)).reshape(flat.shape)
            out = out + shared
        return out.view(x.shape)

    def _routed(self, flat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, shape) -> torch.Tensor:
        """sum over slots of weight x expert(token): flat [tok, d_model], idx / weights [tok, k] -> [tok, d_model].
        Tokens are grouped by expert with one stable sort; each expert runs once, on its tokens only, and adds its
        output in expert order (transformers' order, so sums round alike)."""
        k = idx.shape[-1]
        slots = idx.reshape(-1)  # [tok * k]
        slot_ids = torch.arange(slots.numel(), device=slots.device)
        if self.skip_ratio is not None and k > 1:
            kept = weights >= self.skip_ratio * weights[:, :1]  # [tok, k]; slot 0 always stays
            slot_ids = slot_ids[kept.reshape(-1)]
            slots = slots[slot_ids]
        order = slots.argsort(stable=True)  # [n_slots], grouped by expert
        counts = torch.bincount(slots, minlength=self.n_experts).tolist()  # the one host sync
        sorted_slots = slot_ids[order]
        tokens = sorted_slots // k  # [n_slots]
        w_sorted = weights.reshape(-1)[sorted_slots]  # [n_slots]
        out = torch.zeros_like(flat)  # [tok, d_model]
        start = 0
        for e, count in enumerate(counts):
            if not count:
                continue
            rows = tokens[start:start + count]  # [count]
            y = (self.experts[e](flat[rows]) * w_sorted[start:start + count, None]).to(flat.dtype)  # [count, d_model]
            start += count
            if self.use_expert_outputs:
                dense = torch.zeros_like(flat).index_add_(0, rows, y)  # [tok, d_model]
                out = out + self.experts[e].hook_out(dense.view(shape)).reshape(flat.shape)
            else:
                out.index_add_(0, rows, y)
        if self.use_expert_outputs:  # experts nobody chose still fire their (zero) hook, so caches are complete
            for e, count in enumerate(counts):
                if not count and hooked(self.experts[e].hook_out):
                    out = out + self.experts[e].hook_out(torch.zeros(shape, dtype=flat.dtype, device=flat.device)).reshape(flat.shape)
        return out


def set_skip_ratio(model, ratio: float | None) -> None:
    """Dynamic skipping on every MoE layer of `model` (Lu et al. 2024): a token's slot j > 0 is not computed when its
    routing weight is below `ratio` x its top slot's; None turns it off. Weights are not renormalised."""
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0 <= ratio <= 1):
        raise InputError(f"skip ratio must be in [0, 1] (or None), got {ratio!r}")
    layers = moe_layers(model)
    if not layers:
        raise InputError(f"this {model.cfg.model_type} model has no mixture-of-experts layers to skip experts in")
    for i in layers:
        model.blocks[i].mlp.skip_ratio = None if ratio is None else float(ratio)


def moe_layers(model) -> list[int]:
    """Indices of the blocks whose MLP is a mixture of experts."""
    return [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoE)]
