"""ShortGPT Block Influence and the other layer-importance scores used to choose which layers to remove.

For block i with input x_i (`blocks.{i}.hook_resid_pre`) and output x_{i+1} (`blocks.{i}.hook_resid_post`):

    bi                  1 - mean_t cos(x_i, x_{i+1})                         (Men et al. 2024, ShortGPT)
    angular             mean_t arccos(cos(x_i, x_{i+1})) / pi               (Gromov et al. 2024, per token, all tokens)
    relative-magnitude  mean_t ||f(x)|| / ||x + f(x)||, f(x) = x_{i+1} - x_i (Samragh et al. 2023; ShortGPT's baseline)
    attn-bi             bi of the attention half: resid_pre -> resid_mid
    mlp-bi              bi of the MLP half:       resid_mid -> resid_post

Every score is "how much the block changes the stream": remove the smallest first. Means run over every token of every
calibration sequence (padding excluded). Hook functions reduce each pair of residual streams to per-layer float64 sums
on the fly, so memory does not grow with the number of layers or batches; the forward stops before the unembedding,
which the scores do not need.

`shortgpt_compat=True` reproduces the public reference code, which reads transformers' `output_hidden_states`: there
the last entry is the final-norm output, so the last layer's output is `ln_final.hook_normalized` instead of
`blocks.{L-1}.hook_resid_post`, and a NaN cosine (a zero vector) counts as 0.5. By default the last layer uses its
own output, and tokens whose cosine is undefined are left out of the mean (and counted in `undefined_tokens`).

Removal-order baselines (ShortGPT, section on metrics):
    sequential  from the bottom of the stack, i.e. the input end: layers 0, 1, 2, ...
    reverse     from the top, the output end: layers L-1, L-2, ...  (deeper layers assumed least important)
    random      a seeded random permutation
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch
from residscope.runtime.distributed import all_reduce_sum, all_reduce_sums
from residscope.runtime.runner import forward_batches
from residscope.common.batches import Batch
from residscope.model.errors import InputError

METRICS = ("bi", "angular", "relative-magnitude", "attn-bi", "mlp-bi")
BASELINES = ("sequential", "reverse", "random")
BLOCK_METRICS = ("bi", "angular", "relative-magnitude")  # measured together by one pass over whole blocks

# which residual stream is the input and which the output of the part each metric scores
_PAIR = {
    "bi": ("hook_resid_pre", "hook_resid_post"),
    "angular": ("hook_resid_pre", "hook_resid_post"),
    "relative-magnitude": ("hook_resid_pre", "hook_resid_post"),
    "attn-bi": ("hook_resid_pre", "hook_resid_mid"),
    "mlp-bi": ("hook_resid_mid", "hook_resid_post"),
}
FINAL_NORM_HOOK = "ln_final.hook_normalized"


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise InputError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    return metric


@dataclass
class InfluenceResult:
    """Per-layer scores [n_layers] of one metric (smaller = less influential = removed first) and the statistics
    behind them; the other per-layer means come for free from the same pass."""

    metric: str
    scores: torch.Tensor  # [n_layers] float64
    n_tokens: int  # tokens averaged over (per layer, before excluding undefined cosines)
    shortgpt_compat: bool = False
    mean_cos: torch.Tensor | None = None  # [n_layers] mean cos(in, out)
    angular: torch.Tensor | None = None  # [n_layers] mean arccos(cos)/pi
    relative_magnitude: torch.Tensor | None = None  # [n_layers] mean ||out - in|| / ||out||
    undefined_tokens: torch.Tensor | None = None  # [n_layers] tokens whose cosine was NaN (zero vector)
    source: str | None = None  # calibration text description, when known

    def score(self, metric: str) -> torch.Tensor:
        """Per-layer scores [n_layers] of `metric`: this result's own, or one of the means the same pass measured
        (a pass over whole blocks gives bi, angular and relative-magnitude; the halves need their own pass)."""
        if metric == self.metric:
            return self.scores
        check_metric(metric)
        if self.metric in BLOCK_METRICS and metric in BLOCK_METRICS:
            return {"bi": 1.0 - self.mean_cos, "angular": self.angular, "relative-magnitude": self.relative_magnitude}[metric]
        raise InputError(f"metric {metric!r} needs its own pass; this result scored {self.metric!r}")

    def for_metric(self, metric: str) -> "InfluenceResult":
        """This result relabelled as `metric` (same pass, its scores from `score(metric)`)."""
        return dataclasses.replace(self, metric=metric, scores=self.score(metric))

    def order(self) -> list[int]:
        """All layers, least influential first (ties keep the lower index first)."""
        return removal_order(self.scores, len(self.scores))

    def to_dict(self) -> dict:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, torch.Tensor):
                out[k] = [None if math.isnan(x) else x for x in v.tolist()]
        return out


class _PairStats:
    """Running float64 sums for one (input, output) pair of residual streams."""

    def __init__(self, compat: bool):
        self.compat = compat
        self.cos = 0.0
        self.angular = 0.0
        self.relmag = 0.0
        self.n = 0
        self.n_defined = 0
        self.n_undefined = 0

    def add(self, x_in: torch.Tensor, x_out: torch.Tensor, keep: torch.Tensor | None) -> None:
        a, b = x_in.float(), x_out.float()  # [batch, pos, d_model]
        dot = (a * b).sum(-1)  # [batch, pos]
        na, nb = a.norm(dim=-1), b.norm(dim=-1)
        cos = dot / (na * nb)  # [batch, pos]; NaN when a vector is zero, like the reference code
        relmag = (b - a).norm(dim=-1) / nb  # [batch, pos]
        if keep is not None:
            cos, relmag = cos[keep], relmag[keep]
        cos, relmag = cos.reshape(-1).double(), relmag.reshape(-1).double()
        undefined = torch.isnan(cos)
        self.n += cos.numel()
        self.n_undefined += int(undefined.sum())
        if self.compat:
            cos = cos.nan_to_num(nan=0.5)
            relmag = relmag.nan_to_num(nan=0.0)
        else:
            cos, relmag = cos[~undefined], relmag[~undefined]
        cos = cos.clamp(-1.0, 1.0)
        self.n_defined += cos.numel()
        self.cos += float(cos.sum())
        self.angular += float(torch.arccos(cos).sum() / math.pi)
        self.relmag += float(relmag.sum())

    def means(self) -> tuple[float, float, float]:
        if self.n_defined == 0:
            return math.nan, math.nan, math.nan
        return self.cos / self.n_defined, self.angular / self.n_defined, self.relmag / self.n_defined


def block_influence_result(
    model,
    batches: Iterable[Batch],
    metric: str = "bi",
    *,
    shortgpt_compat: bool = False,
    progress: bool = True,
    source: str | None = None,
    group=None,
) -> InfluenceResult:
    """Stream `batches` (token ids [batch, pos], or (ids, attention_mask)) through `model` and score every layer.

    Under torch.distributed (`group`, or the default group when initialised) each rank scores its share of the batches
    and the float64 sums are all-reduced, so every rank returns the whole corpus's scores.
    """
    check_metric(metric)
    n_layers = len(model.blocks)
    in_hook, out_hook = _PAIR[metric]
    compat_final_norm = shortgpt_compat and out_hook == "hook_resid_post"
    stats = [_PairStats(shortgpt_compat) for _ in range(n_layers)]
    # (batch, layer) -> that layer's input stream, held only until its output arrives (keyed by batch as well: a
    # streamed model runs every batch through one layer before the next)
    pending: dict[tuple[int, int], torch.Tensor] = {}

    def take_input(index: int, layer: int):
        def hook(x, hook):
            pending[index, layer] = x
        return hook

    def take_output(index: int, layer: int, keep: torch.Tensor | None):
        def hook(x, hook):
            stats[layer].add(pending.pop((index, layer)), x, keep)
        return hook

    def hooks_for(index: int, ids: torch.Tensor, mask: torch.Tensor | None) -> list:
        keep = mask.bool() if mask is not None else None  # [batch, pos] real tokens
        out = []
        for i in range(n_layers):
            out.append((f"blocks.{i}.{in_hook}", take_input(index, i)))
            if not (compat_final_norm and i == n_layers - 1):
                out.append((f"blocks.{i}.{out_hook}", take_output(index, i, keep)))
        return out

    n_tokens = 0
    # the scores need only the residual stream: stop before the unembedding (the largest matmul of small models)
    for run in forward_batches(model, batches, hooks=hooks_for, stop_at_layer=n_layers, group=group,
                               progress=progress, desc=f"block influence ({metric})"):
        keep = run.mask.bool() if run.mask is not None else None
        if compat_final_norm:  # the reference reads the last layer's output after the final norm
            final = (FINAL_NORM_HOOK, take_output(run.index, n_layers - 1, keep))
            with model.hooks(fwd_hooks=[final]):
                model.ln_final(run.output)
        n_tokens += int(keep.sum()) if keep is not None else run.ids.numel()
    sums = torch.tensor([[s.cos, s.angular, s.relmag, s.n, s.n_defined, s.n_undefined] for s in stats],
                        dtype=torch.float64)  # [n_layers, 6]
    sums = all_reduce_sum(sums, group)
    n_tokens = int(all_reduce_sums([n_tokens], group)[0])
    for s, row in zip(stats, sums.tolist()):
        s.cos, s.angular, s.relmag = row[:3]
        s.n, s.n_defined, s.n_undefined = (int(x) for x in row[3:])
    if n_tokens == 0:
        raise InputError("batches: no tokens to score")

    means = torch.tensor([s.means() for s in stats], dtype=torch.float64)  # [n_layers, 3]
    mean_cos, angular, relmag = means.unbind(-1)
    scores = {"angular": angular.clone(), "relative-magnitude": relmag.clone()}.get(metric, 1.0 - mean_cos)
    return InfluenceResult(
        metric=metric,
        scores=scores,
        n_tokens=n_tokens,
        shortgpt_compat=shortgpt_compat,
        mean_cos=mean_cos,
        angular=angular,
        relative_magnitude=relmag,
        undefined_tokens=torch.tensor([s.n_undefined for s in stats]),
        source=source,
    )


def influence_results(model, batches: Iterable[Batch], metrics: Sequence[str], *, shortgpt_compat: bool = False,
                      progress: bool = True, source: str | None = None, group=None) -> dict[str, InfluenceResult]:
    """An InfluenceResult per metric, from as few passes as possible: one for bi, angular and relative-magnitude
    together, one each for attn-bi and mlp-bi."""
    for metric in metrics:
        check_metric(metric)
    batches = list(batches)  # read once per pass
    passes: dict[str, InfluenceResult] = {}
    out = {}
    for metric in dict.fromkeys(metrics):
        key = "bi" if metric in BLOCK_METRICS else metric
        if key not in passes:
            passes[key] = block_influence_result(model, batches, key, shortgpt_compat=shortgpt_compat,
                                                 progress=progress, source=source, group=group)
        out[metric] = passes[key].for_metric(metric)
    return out


def block_influence(model, batches: Iterable[Batch], metric: str = "bi", *, shortgpt_compat: bool = False,
                    progress: bool = True, group=None) -> torch.Tensor:
    """Per-layer scores [n_layers] (float64) of `metric`; see `block_influence_result` for the statistics behind them."""
    return block_influence_result(model, batches, metric, shortgpt_compat=shortgpt_compat, progress=progress,
                                  group=group).scores


def removal_order(
    scores_or_baseline: torch.Tensor | Sequence[float] | InfluenceResult | str,
    n: int,
    *,
    n_layers: int | None = None,
    seed: int = 0,
) -> list[int]:
    """The `n` layers to remove, in removal order: smallest score first (stable: ties keep the lower index first),
    or a baseline ("sequential", "reverse", "random" seeded by `seed`), which needs `n_layers`."""
    if isinstance(scores_or_baseline, str):
        name = scores_or_baseline
        if name not in BASELINES:
            raise InputError(f"baseline must be one of {', '.join(BASELINES)} (or pass scores); got {name!r}")
        if n_layers is None:
            raise InputError(f"baseline {name!r} needs n_layers")
        order = list(range(n_layers))
        if name == "reverse":
            order.reverse()
        elif name == "random":
            order = torch.randperm(n_layers, generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        scores = scores_or_baseline.scores if isinstance(scores_or_baseline, InfluenceResult) else scores_or_baseline
        scores = torch.as_tensor(scores, dtype=torch.float64)
        if scores.dim() != 1:
            raise InputError(f"scores must be one value per layer, got shape {tuple(scores.shape)}")
        if torch.isnan(scores).any():
            raise InputError(f"scores: layer {int(torch.isnan(scores).nonzero()[0])} has no defined score (NaN)")
        order = torch.sort(scores, stable=True).indices.tolist()
        n_layers = len(order)
    if not 0 <= n <= n_layers:
        raise InputError(f"remove: cannot remove {n} of {n_layers} layers")
    return order[:n]
