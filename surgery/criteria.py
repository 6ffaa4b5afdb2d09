"""Which blocks to remove, by every published criterion, behind one entry point: `select_layers`.

    order = select_layers(model, calibration_batches, 8, criterion="sleb")   # the 8 blocks, in removal order

Criteria (smaller score = removed first; all on the same calibration batches):

    bi, angular, relative-magnitude,   per-block change of the residual stream (`influence`: ShortGPT, Gromov et al.,
    attn-bi, mlp-bi                    Samragh et al.); one forward
    angular-block   Gromov et al. 2024: the n consecutive blocks [l, l+n) minimising mean arccos(cos(x_l, x_{l+n}))/pi,
                    x_l the stream entering block l and x_{l+n} the stream leaving block l+n-1, on the last (real)
                    token of each sequence; one forward
    ppl             Shortened LLaMA (Kim et al. 2024): calibration perplexity of the model without block j, each j alone
                    (one forked forward, `runtime.forks`)
    taylor          Shortened LLaMA: first-order Taylor importance of block j's weights, as the reference code computes
                    it: sum over the block's weight tensors (projections and norm gains; not biases) of
                    sum_elements |dL/dW * W|, L the mean next-token loss over the calibration tokens (gradients summed
                    over batches before the absolute value); one forward and backward
    sleb            SLEB (Song et al. 2024): greedy; remove the block whose removal gives the lowest calibration
                    perplexity, re-score the rest on the pruned model, repeat (n forked forwards; the reference code's
                    full forward per candidate is `sleb_order(..., naive=True)`)
    blockprune      BlockPruner (Zhong et al. 2024): the same greedy over attention and MLP halves separately; returns
                    (layer, "attn" | "mlp") pairs and stops once the halves removed hold at least the parameters of n
                    whole blocks (the paper compares at equal parameter counts)
    sequential, reverse, random   baselines (reverse: Lu et al. 2024 find it strong once the model is healed)

Every criterion takes `group` (torch.distributed: each rank runs its share of the batches, sums are all-reduced) and
runs on an offloaded model (`--offload`, blocks streamed from disk), except `taylor`, which needs every block's weights
and gradients in memory at once and says so.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from residscope.analyses.perplexity import token_nll_sum
from residscope.common.batches import Batch, unpack_batch
from residscope.model.errors import InputError
from residscope.runtime.distributed import all_reduce_sum, all_reduce_sums, shard
from residscope.runtime.forks import Fork, forked_forward
from residscope.runtime.runner import forward_batches

from .influence import BASELINES, METRICS, influence_results, removal_order

NEW_CRITERIA = ("angular-block", "ppl", "taylor", "sleb", "blockprune")
CRITERIA = METRICS + NEW_CRITERIA + BASELINES
SUBLAYER_CRITERIA = ("blockprune",)  # choose attention / MLP halves, not whole blocks
NEEDS_CALIBRATION = METRICS + NEW_CRITERIA


def check_criterion(criterion: str, arg: str = "criterion") -> str:
    if criterion not in CRITERIA:
        raise InputError(f"{arg} must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    return criterion


def check_count(model, n: int, criterion: str, arg: str = "n") -> None:
    """n blocks to remove: 1..L-1 (angular-block also names its own limit, the depth)."""
    n_layers = len(model.blocks)
    if isinstance(n, bool) or not isinstance(n, int):
        raise InputError(f"{arg} must be an integer, got {n!r}")
    if criterion == "angular-block" and n > n_layers:
        raise InputError(f"{arg}: angular-block needs {n} consecutive blocks but the model has only {n_layers} layers")
    if not 0 < n < n_layers:
        raise InputError(f"{arg} must be between 1 and {n_layers - 1} for this {n_layers}-layer model; got {n}")


@dataclass
class Selection:
    """What a criterion chose and why: `order` (removal order: layer indices, or (layer, part) pairs for blockprune)
    and the numbers behind it."""

    criterion: str
    order: list
    n_tokens: int | None = None  # calibration tokens scored (None for baselines)
    scores: list[float] | None = None  # per layer, smaller = removed first (angular-block: per start layer l)
    steps: list[dict] = field(default_factory=list)  # greedy criteria: one entry per removal
    seconds: float = 0.0
    source: str | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["order"] = [list(x) if isinstance(x, tuple) else x for x in self.order]
        return out


def select_layers(model, batches: Iterable[Batch], n: int, criterion: str = "bi", *, group=None, progress: bool = True,
                  seed: int = 0, shortgpt_compat: bool = False) -> list:
    """The `n` blocks to remove from `model` by `criterion`, in removal order (layer indices in the current numbering;
    (layer, "attn" | "mlp") pairs for blockprune, see the module docstring). `batches`: calibration token ids
    [batch, pos] or (ids, mask); ignored by the baselines (seeded by `seed` for random)."""
    return selection(model, batches, n, criterion, group=group, progress=progress, seed=seed,
                     shortgpt_compat=shortgpt_compat).order


def selection(model, batches: Iterable[Batch] | None, n: int, criterion: str = "bi", *, group=None,
              progress: bool = True, seed: int = 0, shortgpt_compat: bool = False, source: str | None = None) -> Selection:
    """`select_layers` with the scores, greedy steps and time behind the choice."""
    check_criterion(criterion)
    check_count(model, n, criterion)
    start = time.perf_counter()
    if criterion in BASELINES:
        out = Selection(criterion, removal_order(criterion, n, n_layers=len(model.blocks), seed=seed))
    else:
        if batches is None:
            raise InputError(f"criterion {criterion!r} needs calibration batches")
        batches = list(batches)
        if criterion in METRICS:
            result = influence_results(model, batches, [criterion], shortgpt_compat=shortgpt_compat, progress=progress,
                                       group=group)[criterion]
            out = Selection(criterion, removal_order(result, n), result.n_tokens, _floats(result.scores))
        elif criterion == "angular-block":
            out = angular_block(model, batches, n, group=group, progress=progress)
        elif criterion == "ppl":
            out = one_shot_ppl(model, batches, n, group=group, progress=progress)
        elif criterion == "taylor":
            out = taylor(model, batches, n, group=group, progress=progress)
        elif criterion == "sleb":
            out = sleb_order(model, batches, n, group=group, progress=progress)
        else:
            out = blockprune_order(model, batches, n, group=group, progress=progress)
    out.seconds = time.perf_counter() - start
    out.source = source
    return out


def _floats(t) -> list[float]:
    return [None if math.isnan(x) else float(x) for x in torch.as_tensor(t, dtype=torch.float64).tolist()]


# ---- angular distance between blocks n apart (Gromov et al.) ------------------------------------------------------
def last_token_index(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[batch] index of each row's last real token (right or left padding)."""
    if mask is None:
        return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    positions = torch.arange(ids.shape[1], device=ids.device)
    return torch.where(mask.bool(), positions, -1).max(-1).values  # [batch]


def angular_distances(model, batches: Sequence[Batch], n: int, *, group=None, progress: bool = True) -> tuple[torch.Tensor, int]:
    """Mean over sequences of arccos(cos(x_l, x_{l+n}))/pi on the last token, for l = 0..L-n ([L-n+1] float64), and
    the number of sequences."""
    n_layers = len(model.blocks)
    last: dict[tuple[int, int], torch.Tensor] = {}  # (batch, layer) -> [batch, d_model] float64 stream at the last token
    where: dict[int, torch.Tensor] = {}

    def take(index: int, layer: int):
        def hook(x, hook):
            last[index, layer] = x[torch.arange(x.shape[0], device=x.device), where[index]].double()
        return hook

    def hooks_for(index, ids, mask):
        where[index] = last_token_index(ids, mask)
        return [(f"blocks.{i}.hook_resid_pre", take(index, i)) for i in range(n_layers)]

    sums = torch.zeros(n_layers - n + 1, dtype=torch.float64)
    rows = 0
    for run in forward_batches(model, batches, hooks=hooks_for, stop_at_layer=n_layers, group=group, progress=progress,
                               desc="angular distance"):
        take(run.index, n_layers)(run.output, None)  # the stream after the last block (before the final norm)
        states = torch.stack([last.pop((run.index, i)) for i in range(n_layers + 1)])  # [L+1, batch, d_model]
        cos = F.cosine_similarity(states[: n_layers - n + 1], states[n:], dim=-1)  # [L-n+1, batch]
        sums += (torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).sum(-1).cpu()
        rows += states.shape[1]
    sums = all_reduce_sum(sums, group)
    rows = int(all_reduce_sums([rows], group)[0])
    if rows == 0:
        raise InputError("batches: no sequences to score")
    return sums / rows, rows


def angular_block(model, batches: Sequence[Batch], n: int, *, group=None, progress: bool = True) -> Selection:
    dist, rows = angular_distances(model, batches, n, group=group, progress=progress)
    start = int(torch.argmin(dist))  # first minimum: the lowest start on ties
    return Selection("angular-block", list(range(start, start + n)), rows, _floats(dist))


# ---- perplexity of the model without each block -------------------------------------------------------------------
def fork_nll(model, batches: Sequence[Batch], forks: Sequence[Fork], *, removed: Sequence[Fork] = (), group=None,
             progress: bool = True, desc: str = "forks") -> tuple[list[float], int]:
    """Sum of next-token NLL of each fork (the model without `removed` and without the fork's part) over all batches,
    and the number of predicted tokens (all ranks summed)."""
    sums = [0.0] * len(forks)
    n_tokens, counted = 0, set()
    for out in forked_forward(model, batches, forks, removed=removed, group=group, progress=progress, desc=desc):
        s, k = token_nll_sum(out.logits, out.ids, out.mask)
        sums[out.fork] += s
        if out.index not in counted:
            counted.add(out.index)
            n_tokens += k
    *sums, n_tokens = all_reduce_sums([*sums, n_tokens], group)
    if n_tokens == 0:
        raise InputError("batches: no predicted tokens (need rows with 2 or more tokens)")
    return sums, int(n_tokens)


def _ppl(nll_sum: float, n_tokens: int) -> float:
    mean = nll_sum / n_tokens
    return math.exp(mean) if mean < 700 else math.inf


def one_shot_ppl(model, batches: Sequence[Batch], n: int, *, group=None, progress: bool = True) -> Selection:
    layers = list(range(len(model.blocks)))
    sums, n_tokens = fork_nll(model, batches, [Fork(i) for i in layers], group=group, progress=progress,
                              desc="perplexity without each block")
    ppl = [_ppl(s, n_tokens) for s in sums]
    return Selection("ppl", removal_order(torch.tensor(ppl, dtype=torch.float64), n), n_tokens, ppl)


# ---- greedy searches: SLEB (blocks) and BlockPruner (halves) ------------------------------------------------------
def sleb_order(model, batches: Sequence[Batch], n: int, *, group=None, progress: bool = True,
               naive: bool = False) -> Selection:
    """SLEB's greedy: n steps, each scoring every remaining block by the calibration perplexity of the current model
    without it. `naive=True` scores each candidate with a full forward of a pruned copy (the reference code's way; for
    the benchmark and the tests), else one forked forward per step."""
    check_count(model, n, "sleb")
    batches = list(batches)
    removed: list[int] = []
    steps = []
    n_tokens = None
    for step in range(n):
        candidates = [i for i in range(len(model.blocks)) if i not in removed]
        if naive:
            sums, n_tokens = _naive_nll(model, batches, [removed + [c] for c in candidates], group=group)
        else:
            sums, n_tokens = fork_nll(model, batches, [Fork(c) for c in candidates], removed=[Fork(r) for r in removed],
                                      group=group, progress=progress, desc=f"SLEB step {step + 1}/{n}")
        best = min(range(len(candidates)), key=lambda j: (sums[j], j))
        removed.append(candidates[best])
        steps.append({"removed": candidates[best], "ppl": _ppl(sums[best], n_tokens),
                      "candidates": {str(c): _ppl(s, n_tokens) for c, s in zip(candidates, sums)}})
    return Selection("sleb", removed, n_tokens, None, steps)


def _naive_nll(model, batches, removals: Sequence[Sequence[int]], *, group=None) -> tuple[list[float], int]:
    from residscope.analyses.perplexity import perplexity

    from .removal import remove_layers

    sums, n_tokens = [], 0
    for layers in removals:
        r = perplexity(remove_layers(model, layers), batches, progress=False, group=group)
        sums.append(r.nll * r.n_tokens)
        n_tokens = r.n_tokens
    return sums, n_tokens


def half_params(model, layer: int, part: str) -> int:
    module = getattr(model.blocks[layer], part)
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def blockprune_order(model, batches: Sequence[Batch], n: int, *, group=None, progress: bool = True) -> Selection:
    """BlockPruner's greedy over halves until the removed halves hold at least the parameters of `n` whole blocks
    (the mean attention + MLP parameters of a block of this model)."""
    check_count(model, n, "blockprune")
    batches = list(batches)
    n_layers = len(model.blocks)
    size = {(i, part): half_params(model, i, part) for i in range(n_layers) for part in ("attn", "mlp")}
    budget = n * sum(size.values()) / n_layers
    removed: list[tuple[int, str]] = []
    steps, n_tokens, taken = [], None, 0
    while taken < budget:
        candidates = [(i, p) for (i, p), s in size.items() if s > 0 and (i, p) not in removed]
        if not candidates:
            break
        forks = [Fork(i, p) for i, p in candidates]
        sums, n_tokens = fork_nll(model, batches, forks, removed=[Fork(i, p) for i, p in removed], group=group,
                                  progress=progress, desc=f"BlockPruner step {len(steps) + 1}")
        best = min(range(len(candidates)), key=lambda j: (sums[j], j))
        removed.append(candidates[best])
        taken += size[candidates[best]]
        steps.append({"removed": list(candidates[best]), "ppl": _ppl(sums[best], n_tokens), "params_removed": taken,
                      "candidates": {f"{i}.{p}": _ppl(s, n_tokens) for (i, p), s in zip(candidates, sums)}})
    return Selection("blockprune", removed, n_tokens, None, steps)


# ---- first-order Taylor importance (Shortened LLaMA) --------------------------------------------------------------
def taylor_scores(model, batches: Sequence[Batch], *, group=None, progress: bool = True) -> tuple[torch.Tensor, int]:
    """Per block [n_layers] float64: sum over its weight tensors of sum |g * W|, g the gradient of the mean next-token
    loss over all calibration tokens (all ranks); and that token count."""
    if model.offload is not None:
        raise InputError("criterion taylor needs every block's weights and gradients in memory at once; it cannot "
                         "stream (--offload): load the model without --offload")
    from tqdm.auto import tqdm

    from residscope.runtime.distributed import is_main

    weights = [[p for name, p in block.named_parameters() if name.endswith("weight")] for block in model.blocks]
    flags = {p: p.requires_grad for p in model.parameters()}
    grads = [[None] * len(w) for w in weights]
    n_tokens = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            for p in w:
                p.requires_grad_(True)
        mine = list(shard(batches, group))
        with torch.enable_grad():
            for batch in tqdm(mine, desc="taylor (gradients)", disable=not progress or not is_main(group), leave=False):
                ids, mask = unpack_batch(batch)
                ids = ids.to(model.device)
                mask = mask.to(model.device) if mask is not None else None
                logits = model(ids, attention_mask=mask)  # [batch, pos, vocab]
                nll, count = nll_sum_differentiable(logits, ids, mask)
                nll.backward()  # sums gradients over batches in .grad
                n_tokens += count
        for i, w in enumerate(weights):
            for j, p in enumerate(w):
                grads[i][j] = all_reduce_sum(p.grad.double() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64), group)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    n_tokens = int(all_reduce_sums([n_tokens], group)[0])
    if n_tokens == 0:
        raise InputError("batches: no predicted tokens (need rows with 2 or more tokens)")
    scores = torch.tensor([sum(float((g / n_tokens * p.detach().double()).abs().sum()) for g, p in zip(gs, w))
                           for gs, w in zip(grads, weights)], dtype=torch.float64)
    return scores, n_tokens


def nll_sum_differentiable(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(sum of next-token NLL as a tensor with its graph, number of predicted tokens): `token_nll_sum` for backward."""
    pred = logits[:, :-1]  # [batch, pos-1, vocab]
    if pred.dtype in (torch.float16, torch.bfloat16):
        pred = pred.float()  # float32 log-softmax at least, as `token_nll_sum`; float64 models keep float64
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    if mask is not None:
        keep = (mask[:, 1:].bool() & mask[:, :-1].bool()).reshape(-1)
        nll = nll[keep]
    return nll.sum(), int(nll.numel())


def taylor(model, batches: Sequence[Batch], n: int, *, group=None, progress: bool = True) -> Selection:
    scores, n_tokens = taylor_scores(model, batches, group=group, progress=progress)
    return Selection("taylor", removal_order(scores, n), n_tokens, _floats(scores))
