"""What the routers of a mixture-of-experts model do over a corpus, in one streamed pass (`routing_statistics`):

- load: each expert's share of the routed (token, slot) pairs, per layer; `weight_mass`: the mean routing weight it
  receives per token; `prob_mass`: its mean router probability (P_i of the auxiliary loss)
- entropy of the router's distribution (nats, mean over tokens) and the top-k probability mass (before renormalising)
- load imbalance: E * sum_i f_i P_i, the quantity the Switch / Qwen / Mixtral auxiliary loss minimises (f_i: share of
  routed slots, P_i: mean probability); 1 when routing is uniform, E when one expert takes everything
- the shared expert's gate: mean and a histogram over [0, 1]
- specialisation: the most frequent token ids per expert (and the share of the expert's tokens they make up), the load
  by position bucket (OpenMoE's "routing drifts late in the sequence"), and agreement between consecutive layers (joint
  counts of top-1 experts; normalised mutual information and how often the next layer's top-1 is the most common one
  given this layer's)
- REAP saliency (Lasby et al.): mean over routed tokens of router weight x ||expert output|| (the weighted output's norm)
- expert logit attribution (`expert_attribution`): each expert's direct contribution to the next-token logit, exact as
  for heads (its output / ln_final's scale . the token's unembedding direction); experts, shared expert and the other
  components sum to the logit.

All batches go through `runtime.runner.forward_batches` (sharded over `--nproc` ranks, streamed when offloaded); sums
are float64 and all-reduced, so every rank returns the corpus's figures.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch

from residscope.common.batches import Batch
from residscope.model.errors import InputError
from residscope.model.moe import moe_layers

from residscope.runtime.distributed import all_reduce_sum, gather_items, rank_and_size
from residscope.runtime.runner import forward_batches

GATE_BINS = 10


def require_moe(model) -> list[int]:
    layers = moe_layers(model)
    if not layers:
        raise InputError(f"--model: this {model.cfg.model_type} model has no mixture-of-experts layers")
    return layers


@dataclass
class RoutingStats:
    layers: list[int]  # MoE layer indices; every [layer, ...] tensor follows this order
    n_experts: int
    top_k: int
    n_tokens: int
    load: torch.Tensor  # [layer, expert] share of routed slots (rows sum to 1)
    weight_mass: torch.Tensor  # [layer, expert] mean routing weight per token
    prob_mass: torch.Tensor  # [layer, expert] mean router probability per token
    entropy: torch.Tensor  # [layer] mean router entropy (nats); log(E) is uniform
    topk_mass: torch.Tensor  # [layer] mean probability of the chosen k before renormalisation
    imbalance: torch.Tensor  # [layer] E * sum_i f_i P_i (1: balanced)
    reap: torch.Tensor  # [layer, expert] mean over routed tokens of ||weight x expert output|| (0: never routed)
    position_load: torch.Tensor  # [layer, bucket, expert] share of each position bucket's slots
    position_edges: list[int]  # bucket b holds positions edges[b] <= p < edges[b + 1]
    agreement_nmi: torch.Tensor  # [layer - 1] normalised mutual information of top-1 experts, layer l vs l + 1
    agreement_top1: torch.Tensor  # [layer - 1] P(next top-1 = its most common value given this top-1)
    top_tokens: list[list[list[tuple[int, float]]]]  # [layer][expert] -> (token id, share of the expert's tokens)
    shared_gate_mean: torch.Tensor | None = None  # [layer]
    shared_gate_hist: torch.Tensor | None = None  # [layer, GATE_BINS] share of tokens per gate bin over [0, 1]
    source: str | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, torch.Tensor):
                out[k] = v.tolist()
        return out

    def rank(self, criterion: str) -> torch.Tensor:
        """[layer, expert] score per expert under a pruning criterion: higher = keep first."""
        scores = {"frequency": self.load, "weight": self.weight_mass, "reap": self.reap}
        if criterion not in scores:
            raise InputError(f"criterion must be one of {', '.join(scores)}, got {criterion!r}")
        return scores[criterion]


@dataclass
class _Acc:
    """Per-layer float64 sums."""

    counts: torch.Tensor
    weight: torch.Tensor
    prob: torch.Tensor
    reap_sum: torch.Tensor
    entropy: float = 0.0
    topk: float = 0.0
    gate_sum: float = 0.0
    gate_hist: torch.Tensor = field(default_factory=lambda: torch.zeros(GATE_BINS, dtype=torch.float64))
    pos: torch.Tensor | None = None
    tokens: Counter = field(default_factory=Counter)


def _position_edges(seq_len: int, n_buckets: int) -> list[int]:
    n = max(1, min(n_buckets, seq_len))
    return sorted({round(b * seq_len / n) for b in range(n + 1)})


def routing_statistics(model, batches: Iterable[Batch], *, position_buckets: int = 8, top_tokens: int = 10,
                       reap: bool = True, progress: bool = True, source: str | None = None, group=None) -> RoutingStats:
    """Routing figures of every MoE layer over `batches` (token ids [batch, pos] or (ids, mask)); see the module doc.
    `reap`: also measure REAP saliency (turns on the per-expert output hooks for the pass)."""
    layers = require_moe(model)
    batches = list(batches)
    if not batches:
        raise InputError("batches: no tokens to route")
    first = batches[0][0] if isinstance(batches[0], (tuple, list)) else batches[0]
    seq_len = first.shape[-1]
    edges = _position_edges(seq_len, position_buckets)
    n_exp, k = model.cfg.n_experts, model.cfg.experts_per_tok
    f64 = dict(dtype=torch.float64)
    acc = {i: _Acc(torch.zeros(n_exp, **f64), torch.zeros(n_exp, **f64), torch.zeros(n_exp, **f64),
                   torch.zeros(n_exp, **f64), pos=torch.zeros(len(edges) - 1, n_exp, **f64)) for i in layers}
    joint = {i: torch.zeros(n_exp, n_exp, **f64) for i in layers[:-1]}
    bucket_of = torch.bucketize(torch.arange(seq_len), torch.tensor(edges[1:-1]), right=True)  # [pos]
    n_tokens = 0

    def keep_of(mask, shape):
        return mask.bool().reshape(-1) if mask is not None else torch.ones(math.prod(shape), dtype=torch.bool)

    # (batch, layer) -> indices [tok_kept, k], kept until the next MoE layer has compared its top-1 with them (batches
    # run layer-major when offloaded, so this lives outside the per-batch hooks)
    chosen: dict[tuple[int, int], torch.Tensor] = {}

    def hooks_for(index: int, ids: torch.Tensor, mask):
        keep = keep_of(mask, ids.shape)  # [tok]
        flat_ids = ids.reshape(-1).cpu()[keep]  # [tok_kept]
        pos_bucket = bucket_of[: ids.shape[1]].expand(ids.shape).reshape(-1)[keep]  # [tok_kept]
        out = []
        for j, i in enumerate(layers):
            a = acc[i]

            def on_logits(x, hook, a=a):
                probs = x.reshape(-1, x.shape[-1])[keep.to(x.device)].double().softmax(-1).cpu()  # [tok, E]
                a.prob += probs.sum(0)
                a.entropy += float(-(probs * probs.clamp_min(1e-300).log()).sum())
                a.topk += float(probs.topk(k, dim=-1).values.sum())

            def on_indices(x, hook, a=a, i=i, j=j):
                idx = x.reshape(-1, x.shape[-1])[keep.to(x.device)].cpu()  # [tok, k]
                chosen[index, i] = idx
                a.counts += torch.bincount(idx.reshape(-1), minlength=n_exp).double()
                a.pos.index_put_((pos_bucket[:, None].expand_as(idx).reshape(-1), idx.reshape(-1)),
                                 torch.ones(idx.numel(), **f64), accumulate=True)
                keys, counts = torch.unique(idx.reshape(-1) * vocab + flat_ids[:, None].expand_as(idx).reshape(-1),
                                            return_counts=True)
                a.tokens.update(dict(zip(keys.tolist(), counts.tolist())))
                if j > 0 and (index, layers[j - 1]) in chosen:  # top-1 agreement with the previous MoE layer
                    prev = chosen.pop((index, layers[j - 1]))[:, 0]
                    joint[layers[j - 1]].index_put_((prev, idx[:, 0]), torch.ones(len(prev), **f64), accumulate=True)

            def on_weights(x, hook, a=a, i=i):  # fires after hook_expert_indices
                w = x.reshape(-1, x.shape[-1])[keep.to(x.device)].double().cpu()  # [tok, k]
                a.weight.index_add_(0, chosen[index, i].reshape(-1), w.reshape(-1))
                if i == layers[-1]:
                    del chosen[index, i]

            out += [(f"blocks.{i}.mlp.hook_router_logits", on_logits),
                    (f"blocks.{i}.mlp.hook_expert_indices", on_indices),
                    (f"blocks.{i}.mlp.hook_expert_weights", on_weights)]
            if model.blocks[i].mlp.has_shared_expert:
                def on_gate(x, hook, a=a):
                    g = x.reshape(-1)[keep.to(x.device)].double().cpu()  # [tok]
                    a.gate_sum += float(g.sum())
                    a.gate_hist += torch.histc(g, bins=GATE_BINS, min=0.0, max=1.0)
                out.append((f"blocks.{i}.mlp.hook_shared_gate", on_gate))
            if reap:
                for e in range(n_exp):
                    def on_out(x, hook, a=a, e=e):  # zero rows where the expert was not chosen add nothing
                        norms = x.reshape(-1, x.shape[-1])[keep.to(x.device)].double().norm(dim=-1)  # [tok]
                        a.reap_sum[e] += float(norms.sum())
                    out.append((f"blocks.{i}.mlp.experts.{e}.hook_out", on_out))
        return out

    vocab = model.cfg.d_vocab
    if reap:
        model.set_use_expert_outputs(True)
    try:
        for run in forward_batches(model, batches, hooks=hooks_for, stop_at_layer=max(layers) + 1, group=group,
                                   progress=progress, desc="routing statistics"):
            n_tokens += int(run.mask.sum()) if run.mask is not None else run.ids.numel()
    finally:
        if reap:
            model.set_use_expert_outputs(False)

    return _finish(model, layers, acc, joint, n_tokens, edges, top_tokens, source, group)


def _finish(model, layers, acc, joint, n_tokens, edges, n_top, source, group) -> RoutingStats:
    n_exp, k = model.cfg.n_experts, model.cfg.experts_per_tok
    # one all-reduce of everything numeric
    parts = []
    for i in layers:
        a = acc[i]
        parts += [a.counts, a.weight, a.prob, a.reap_sum, a.pos.reshape(-1), a.gate_hist,
                  torch.tensor([a.entropy, a.topk, a.gate_sum], dtype=torch.float64)]
    parts += [joint[i].reshape(-1) for i in layers[:-1]] + [torch.tensor([float(n_tokens)], dtype=torch.float64)]
    sizes = [p.numel() for p in parts]
    flat = all_reduce_sum(torch.cat(parts), group)
    parts = list(torch.split(flat, sizes))
    n_tokens = int(parts.pop()[0])
    if n_tokens == 0:
        raise InputError("batches: no tokens to route")
    nb = len(edges) - 1
    rows = {name: [] for name in ("load", "weight", "prob", "reap", "pos", "hist", "entropy", "topk", "gate")}
    for i in layers:
        counts, weight, prob, reap_sum, pos, hist, scal = parts[:7]
        del parts[:7]
        rows["load"].append(counts / counts.sum().clamp_min(1))
        rows["weight"].append(weight / n_tokens)
        rows["prob"].append(prob / n_tokens)
        rows["reap"].append(torch.where(counts > 0, reap_sum / counts.clamp_min(1), torch.zeros_like(counts)))
        pos = pos.reshape(nb, n_exp)
        rows["pos"].append(pos / pos.sum(-1, keepdim=True).clamp_min(1))
        rows["hist"].append(hist / n_tokens)
        rows["entropy"].append(scal[0] / n_tokens)
        rows["topk"].append(scal[1] / n_tokens)
        rows["gate"].append(scal[2] / n_tokens)
    nmi, agree = [], []
    for i in layers[:-1]:
        j = parts.pop(0).reshape(n_exp, n_exp)
        nmi.append(_nmi(j))
        agree.append(float(j.max(-1).values.sum() / j.sum().clamp_min(1)))
    load, prob = torch.stack(rows["load"]), torch.stack(rows["prob"])
    shared = [i for i in layers if model.blocks[i].mlp.has_shared_expert]
    rank = rank_and_size(group)[0]
    tokens = {i: Counter() for i in layers}
    for (_, i), counts in gather_items({(rank, i): dict(acc[i].tokens) for i in layers}, group).items():
        tokens[i].update(counts)
    return RoutingStats(
        layers=list(layers), n_experts=n_exp, top_k=k, n_tokens=n_tokens, load=load,
        weight_mass=torch.stack(rows["weight"]), prob_mass=prob, entropy=torch.stack(rows["entropy"]),
        topk_mass=torch.stack(rows["topk"]), imbalance=n_exp * (load * prob).sum(-1),
        reap=torch.stack(rows["reap"]), position_load=torch.stack(rows["pos"]), position_edges=list(edges),
        agreement_nmi=torch.tensor(nmi, dtype=torch.float64), agreement_top1=torch.tensor(agree, dtype=torch.float64),
        top_tokens=[_top_tokens(tokens[i], n_exp, model.cfg.d_vocab, n_top) for i in layers],
        shared_gate_mean=torch.stack(rows["gate"]) if shared else None,
        shared_gate_hist=torch.stack(rows["hist"]) if shared else None, source=source)


def _nmi(joint: torch.Tensor) -> float:
    """Normalised mutual information (arithmetic mean of the entropies) of a joint count matrix; 0 when empty."""
    total = joint.sum()
    if total <= 0:
        return 0.0
    p = joint / total
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum())
    ha = float(-(pa[pa > 0] * pa[pa > 0].log()).sum())
    hb = float(-(pb[pb > 0] * pb[pb > 0].log()).sum())
    return 0.0 if ha + hb == 0 else 2 * mi / (ha + hb)


def _top_tokens(counts: dict, n_exp: int, vocab: int, n: int) -> list[list[tuple[int, float]]]:
    per = [Counter() for _ in range(n_exp)]
    for key, c in counts.items():
        per[int(key) // vocab][int(key) % vocab] += c
    out = []
    for e in range(n_exp):
        total = sum(per[e].values())
        out.append([(tok, c / total) for tok, c in per[e].most_common(n)] if total else [])
    return out


@dataclass
class ExpertAttribution:
    """Mean direct logit attribution to the next token, per expert: expert e's weighted output (zero where it was not
    chosen) divided by ln_final's scale, dotted with the next token's unembedding direction; experts + shared expert =
    the MLP's own attribution (`mlp_total`), exactly."""

    layers: list[int]
    per_expert: torch.Tensor  # [layer, expert] mean over predicted tokens
    shared: torch.Tensor | None  # [layer], with a shared expert
    mlp_total: torch.Tensor  # [layer] the whole MLP output's attribution (check: per_expert.sum(-1) + shared)
    n_tokens: int

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in asdict(self).items()}


def expert_attribution(model, batches: Iterable[Batch], *, progress: bool = True, group=None) -> ExpertAttribution:
    """Per-expert direct logit attribution over `batches` (see ExpertAttribution); streamed and sharded like
    `routing_statistics`."""
    layers = require_moe(model)
    if model.cfg.norm != "rms":
        raise InputError("expert attribution divides by the final RMSNorm's scale; this model's final norm is a LayerNorm")
    n_exp = model.cfg.n_experts
    shared = any(model.blocks[i].mlp.has_shared_expert for i in layers)
    sums = torch.zeros(len(layers), n_exp + 2, dtype=torch.float64)  # experts, shared, whole MLP
    pending: dict[int, list[tuple[int, int, torch.Tensor]]] = {}  # batch -> (row, column, out . direction [b, p-1])
    n_tokens = 0

    def hooks_for(index: int, ids: torch.Tensor, mask):
        dirs = model.unembed_directions(ids[:, 1:])  # [batch, pos - 1, d_model]
        counted = (mask[:, :-1] & mask[:, 1:]).bool() if mask is not None else None  # [batch, pos - 1]
        pending.setdefault(index, [])  # offloaded runs call this once per block and batch

        def dot(row: int, col: int):
            def hook(x, hook):
                pending[index].append((row, col, (x[:, :-1].to(dirs.dtype) * dirs).sum(-1)))  # [batch, pos - 1]
            return hook

        def on_scale(x, hook):  # [batch, pos, 1]
            scale = x[:, :-1, 0].to(dirs.dtype)
            for row, col, d in pending.pop(index):
                v = d / scale
                sums[row, col] += float(v[counted].sum() if counted is not None else v.sum())

        out = []
        for r, i in enumerate(layers):
            out += [(f"blocks.{i}.mlp.experts.{e}.hook_out", dot(r, e)) for e in range(n_exp)]
            if model.blocks[i].mlp.has_shared_expert:
                out.append((f"blocks.{i}.mlp.hook_shared_out", dot(r, n_exp)))
            out.append((f"blocks.{i}.hook_mlp_out", dot(r, n_exp + 1)))
        return out + [("ln_final.hook_scale", on_scale)]

    model.set_use_expert_outputs(True)
    try:
        for run in forward_batches(model, batches, hooks=hooks_for, group=group, progress=progress,
                                   desc="expert attribution"):
            m = run.mask
            n_tokens += int((m[:, :-1] & m[:, 1:]).sum()) if m is not None else run.ids[:, 1:].numel()
    finally:
        model.set_use_expert_outputs(False)
    sums = all_reduce_sum(sums, group)
    n_tokens = int(all_reduce_sum(torch.tensor([float(n_tokens)], dtype=torch.float64), group)[0])
    if n_tokens == 0:
        raise InputError("batches: no predicted tokens to attribute")
    means = sums / n_tokens
    return ExpertAttribution(layers=list(layers), per_expert=means[:, :n_exp], shared=means[:, n_exp] if shared else None,
                             mlp_total=means[:, n_exp + 1], n_tokens=n_tokens)
