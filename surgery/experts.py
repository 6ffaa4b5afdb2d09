"""Expert pruning: keep `keep` of the E routed experts in every mixture-of-experts layer, chosen by

    frequency        how often the router picks the expert (share of routed slots)
    weight           the routing weight it receives (router-weight mass)
    reap             REAP's saliency: mean over routed tokens of router weight x ||expert output||
    reconstruction   Lu et al. 2024 ("Not All Experts are Equal"): per layer, the subset whose layer output on
                     calibration inputs is closest (mean squared error) to the full layer's, the router choosing among
                     the kept experts only; every subset when there are at most `max_subsets`, else greedy backward
                     elimination (drop the expert whose removal costs least, repeat)

The pruned model has the kept experts (renumbered 0..keep-1 in original order) and the matching router rows, so it is a
standard checkpoint with `num_experts = keep` (`save_pretrained`); transformers reloads it with the same logits.
Dynamic skipping (the other half of Lu et al.) is a run-time switch: `residscope.model.moe.set_skip_ratio`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from residscope.analyses.experts import RoutingStats, routing_statistics
from residscope.runtime.runner import forward_batches
from residscope.common.batches import Batch
from residscope.model.errors import InputError
from residscope.model.moe import MoE, moe_layers

from .removal import _copy_model

CRITERIA = ("frequency", "weight", "reap", "reconstruction")


@dataclass
class ExpertChoice:
    criterion: str
    keep: dict[int, list[int]]  # layer (current numbering) -> kept experts, original indices, ascending
    scores: dict[int, list[float]]  # layer -> per-expert score (higher = kept first), or per-subset loss of the kept set
    n_experts_before: int

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "kept_experts": {str(k): v for k, v in self.keep.items()},
                "scores": {str(k): v for k, v in self.scores.items()}, "n_experts_before": self.n_experts_before}


def check_keep(model, keep: int, arg: str = "--keep") -> list[int]:
    """The MoE layers of `model`, after refusing a `keep` it cannot have (one line naming `arg`)."""
    layers = moe_layers(model)
    if not layers:
        raise InputError(f"--model: this {model.cfg.model_type} model is dense (no mixture-of-experts layers): "
                         "there are no experts to prune")
    n, k = model.cfg.n_experts, model.cfg.experts_per_tok
    if isinstance(keep, bool) or not isinstance(keep, int) or not k <= keep <= n:
        raise InputError(f"{arg} must be between experts_per_token ({k}) and num_experts ({n}), got {keep!r}")
    return layers


def choose_experts(model, batches: Iterable[Batch], keep: int, criterion: str, *, stats: RoutingStats | None = None,
                   max_subsets: int = 5000, max_tokens: int = 4096, progress: bool = True, group=None) -> ExpertChoice:
    """Which `keep` experts each MoE layer keeps under `criterion` (see the module doc), from calibration `batches`."""
    layers = check_keep(model, keep)
    if criterion not in CRITERIA:
        raise InputError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if criterion == "reconstruction":
        return _by_reconstruction(model, list(batches), layers, keep, max_subsets, max_tokens, progress, group)
    if stats is None:
        stats = routing_statistics(model, batches, reap=criterion == "reap", progress=progress, group=group)
    scores = stats.rank(criterion)  # [layer, expert]
    chosen, per_layer = {}, {}
    for row, i in enumerate(stats.layers):
        s = scores[row]
        order = sorted(range(len(s)), key=lambda e: (-float(s[e]), e))  # ties: lower index first
        chosen[i] = sorted(order[:keep])
        per_layer[i] = [float(x) for x in s]
    return ExpertChoice(criterion, chosen, per_layer, model.cfg.n_experts)


def _layer_inputs(model, batches, layers, max_tokens, progress, group) -> dict[int, torch.Tensor]:
    """Up to `max_tokens` calibration inputs [tokens, d_model] of each MoE layer (the normed stream its router reads)."""
    got: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def hooks_for(index, ids, mask):
        keep = mask.bool().reshape(-1) if mask is not None else None

        def take(i):
            def hook(x, hook):
                rows = x.reshape(-1, x.shape[-1])
                rows = rows[keep.to(x.device)] if keep is not None else rows
                if sum(len(r) for r in got[i]) < max_tokens:
                    got[i].append(rows.detach().clone())
            return hook
        return [(_input_hook(model, i), take(i)) for i in layers]

    for _ in forward_batches(model, batches, hooks=hooks_for, stop_at_layer=max(layers) + 1, group=group,
                             progress=progress, desc="calibration inputs"):
        pass
    return {i: torch.cat(got[i])[:max_tokens] for i in layers}


def _input_hook(model, layer: int) -> str:
    block = model.blocks[layer]
    return f"blocks.{layer}.ln2.hook_normalized" if hasattr(block, "ln2") and block.pre_norms else f"blocks.{layer}.hook_mlp_in"


@torch.inference_mode()
def subset_output(moe: MoE, expert_out: torch.Tensor, logits: torch.Tensor, subset: list[int]) -> torch.Tensor:
    """The routed part of `moe`'s output when only `subset` remains: expert_out [E, tok, d_model] (every expert on every
    token), logits [tok, E] -> [tok, d_model], routed exactly as the pruned layer would (softmax over the kept rows)."""
    sub = torch.tensor(subset, device=logits.device)
    idx, w = moe.weights_of(logits[:, sub])  # [tok, k] each, indices into `subset`
    w = w if moe.routing_fp32 else w.to(expert_out.dtype)
    chosen = expert_out[sub[idx], torch.arange(len(idx), device=idx.device)[:, None]]  # [tok, k, d_model]
    return (chosen * w[..., None]).sum(1).to(expert_out.dtype)


def _by_reconstruction(model, batches, layers, keep, max_subsets, max_tokens, progress, group) -> ExpertChoice:
    inputs = _layer_inputs(model, batches, layers, max_tokens, progress, group)
    n = model.cfg.n_experts
    chosen, per_layer = {}, {}
    with torch.inference_mode():
        for i in layers:
            moe: MoE = model.blocks[i].mlp
            x = inputs[i].to(moe.router.weight.device)  # [tok, d_model]
            logits = moe.router(x)  # [tok, E]
            expert_out = torch.stack([moe.experts[e](x) for e in range(n)])  # [E, tok, d_model]
            full = subset_output(moe, expert_out, logits, list(range(n)))

            def loss(subset):
                return float((subset_output(moe, expert_out, logits, list(subset)) - full).double().pow(2).sum(-1).mean())

            if math.comb(n, keep) <= max_subsets:
                best = min(itertools.combinations(range(n), keep), key=loss)
            else:  # greedy backward elimination
                best = tuple(range(n))
                while len(best) > keep:
                    best = min((tuple(e for e in best if e != drop) for drop in best), key=loss)
            chosen[i] = sorted(best)
            per_layer[i] = [loss(best)]
    return ExpertChoice("reconstruction", chosen, per_layer, n)


def prune_experts(model, keep: dict[int, list[int]], *, copy: bool = True):
    """The model with only the `keep[layer]` experts (original indices) in each MoE layer, and their router rows; every
    MoE layer must keep the same number (the config has one num_experts). `copy=False` changes `model` in place."""
    layers = moe_layers(model)
    sizes = {len(v) for v in keep.values()}
    if set(keep) != set(layers) or len(sizes) != 1:
        raise InputError(f"keep: give the same number of experts for every MoE layer {layers}")
    n_keep = sizes.pop()
    check_keep(model, n_keep, arg="keep")
    for i, experts in keep.items():
        if len(set(experts)) != len(experts) or not all(0 <= e < model.blocks[i].mlp.n_experts for e in experts):
            raise InputError(f"keep: layer {i} lists {experts}; need distinct experts in 0..{model.blocks[i].mlp.n_experts - 1}")
    if copy:
        model = _copy_model(model)
    origin = getattr(model, "expert_origin", None) or {}
    for i, experts in keep.items():
        moe: MoE = model.blocks[i].mlp
        experts = sorted(experts)
        old = moe.router
        router = nn.Linear(old.in_features, len(experts), bias=old.bias is not None, device=old.weight.device,
                           dtype=old.weight.dtype)
        with torch.no_grad():
            router.weight.copy_(old.weight[experts])
            if old.bias is not None:
                router.bias.copy_(old.bias[experts])
        moe.router = router
        moe.experts = nn.ModuleList(moe.experts[e] for e in experts)
        moe.n_experts = len(experts)
        before = origin.get(model.layer_origin[i], list(range(len(old.weight))))
        origin[model.layer_origin[i]] = [before[e] for e in experts]
    model.expert_origin = origin  # original layer -> original expert ids kept (for the export record)
    model.cfg = model.cfg.replace(n_experts=n_keep)
    model.setup()  # hook names of the renumbered experts
    return model


def expert_pruning_record(choice: ExpertChoice, model) -> dict:
    """residscope_pruning.json fields of an expert-pruned model."""
    return {"expert_pruning": {**choice.to_dict(), "n_experts_after": model.cfg.n_experts,
                               "kept_experts_original": {str(k): v for k, v in
                                                         sorted(getattr(model, "expert_origin", {}).items())}}}
