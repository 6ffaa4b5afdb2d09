"""Which layers to cut: held-out perplexity after removing the same number of layers by each criterion and baseline
(ShortGPT's comparison, extended to every criterion of `criteria`), how much each choice moves when the calibration
text changes, and the single choice that a pruning run makes.

    cmp = compare_removals(model, 4, eval_batches, calibration_batches=calib, stability_batches=calib_b, seeds=5)
    for row in cmp.rows:
        print(row.method, row.ppl / cmp.dense.ppl, row.overlap, row.rank_correlation)

Every candidate is scored on the same held-out batches and chosen on the same calibration batches; Block Influence
metrics share their passes (`influence_results`), and the random baseline is averaged over seeds 0..seeds-1.
Stability: with `stability_batches` (a second calibration slice, disjoint from the first) every criterion chooses
again; `overlap` is the share of the chosen blocks (or halves) both slices pick, `rank_correlation` the Spearman
correlation of the per-layer scores on the two slices (criteria that score every layer; None for the greedy ones).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from residscope.analyses.perplexity import PerplexityResult, perplexity
from residscope.common.batches import Batch
from residscope.model.errors import InputError

from .criteria import CRITERIA, NEW_CRITERIA, Selection, selection
from .influence import BASELINES, METRICS, InfluenceResult, influence_results, removal_order
from .removal import remove_layers, remove_sublayers


@dataclass
class RemovalRow:
    method: str  # a metric, a baseline, or "random (mean of N)"
    removed: list[int] | None  # layers removed, in removal order; None for the seeded random baseline
    ppl: float  # held-out perplexity after removal (mean over seeds for random)
    ppl_std: float | None  # spread over seeds (random with 2 or more seeds), else None
    ppls: list[float] = field(default_factory=list)  # one per run
    removed_b: list | None = None  # what the criterion chooses on the second calibration slice
    overlap: float | None = None  # |chosen on slice A & chosen on slice B| / number chosen
    rank_correlation: float | None = None  # Spearman of the per-layer scores on the two slices
    seconds: float | None = None  # time to choose (slice A)


@dataclass
class RemovalComparison:
    n_layers: int
    n_remove: int
    dense: PerplexityResult
    rows: list[RemovalRow]

    def to_dict(self) -> dict:
        return {"removed": self.n_remove, "n_layers": self.n_layers, "dense": self.dense.to_dict(),
                "rows": [asdict(r) for r in self.rows]}


def removal_for(method: str, n_remove: int, *, n_layers: int, influences: dict[str, InfluenceResult] | None = None,
                seed: int = 0) -> list[int]:
    """The layers `method` removes: the lowest-scoring of `influences[method]` for a metric, else the baseline."""
    if method in BASELINES:
        return removal_order(method, n_remove, n_layers=n_layers, seed=seed)
    if influences is None or method not in influences:
        raise InputError(f"method {method!r}: no influence scores for it (metrics: {', '.join(METRICS)})")
    return removal_order(influences[method], n_remove)


def heldout_scorer(eval_batches: Sequence[Batch], source: str | None = None, *, progress: bool = False):
    """A function model -> PerplexityResult on the same held-out batches every time (labelled with `source`)."""
    def score(model) -> PerplexityResult:
        result = perplexity(model, eval_batches, progress=progress, desc="held-out perplexity")
        result.source = source
        return result
    return score


def apply_removal(model, order: list):
    """A copy of `model` without `order`: layer indices, or (layer, "attn" | "mlp") pairs (sub-block criteria)."""
    if order and isinstance(order[0], (tuple, list)):
        return remove_sublayers(model, attn=[i for i, part in order if part == "attn"],
                                mlp=[i for i, part in order if part == "mlp"])
    return remove_layers(model, order)


def overlap(a: list, b: list) -> float:
    """Share of the chosen blocks (or halves) that both choices contain."""
    key = lambda x: tuple(x) if isinstance(x, (list, tuple)) else x  # noqa: E731
    return len({key(x) for x in a} & {key(x) for x in b}) / max(1, len(a))


def rank_correlation(a: Sequence[float] | None, b: Sequence[float] | None) -> float | None:
    """Spearman correlation of two score vectors (average ranks for ties); None without both or when constant."""
    if a is None or b is None or len(a) != len(b) or len(a) < 2 or None in a or None in b:
        return None
    from scipy.stats import spearmanr

    rho = spearmanr(a, b).statistic
    return None if rho != rho else float(rho)  # NaN for a constant vector


def choose(model, method: str, n_remove: int, batches, *, influences=None, seed: int = 0, progress: bool = False,
           shortgpt_compat: bool = False, source: str | None = None) -> Selection:
    """The Selection `method` makes on `batches` (Block Influence metrics read `influences` when given)."""
    if method in METRICS and influences is not None and method in influences:
        result = influences[method]
        return Selection(method, removal_order(result, n_remove), result.n_tokens,
                         [None if x != x else float(x) for x in result.scores.tolist()], source=result.source)
    return selection(model, batches, n_remove, method, progress=progress, seed=seed, shortgpt_compat=shortgpt_compat,
                     source=source)


def compare_removals(model, n_remove: int, eval_batches: Sequence[Batch], *,
                     calibration_batches: Iterable[Batch] | None = None, methods: Sequence[str] = METRICS + BASELINES,
                     influences: dict[str, InfluenceResult] | None = None, seeds: int = 5, shortgpt_compat: bool = False,
                     eval_source: str | None = None, calibration_source: str | None = None,
                     stability_batches: Iterable[Batch] | None = None, stability_source: str | None = None,
                     dense: PerplexityResult | None = None, progress: bool = False) -> RemovalComparison:
    """Held-out perplexity of `model` with `n_remove` layers removed by each method (any of `criteria.CRITERIA`:
    Block Influence metrics from `influences` or computed on `calibration_batches`, the other criteria on
    `calibration_batches`, baselines; random averaged over `seeds` seeds), beside the dense model's; with
    `stability_batches`, each criterion's choice on that second slice too (overlap, rank correlation)."""
    n_layers = len(model.blocks)
    unknown = [m for m in methods if m not in CRITERIA]
    if unknown:
        raise InputError(f"methods: unknown {unknown} (choose from {', '.join(CRITERIA)})")
    if not 0 < n_remove < n_layers:
        raise InputError(f"n_remove must be between 1 and {n_layers - 1} for this {n_layers}-layer model; got {n_remove}")
    if seeds < 1:
        raise InputError(f"seeds must be >= 1, got {seeds}")
    calibration_batches = list(calibration_batches) if calibration_batches is not None else None
    metrics = [m for m in methods if m in METRICS and m not in (influences or {})]
    needs = [m for m in methods if m in NEW_CRITERIA or m in metrics]
    if needs and calibration_batches is None:
        raise InputError(f"criteria {needs} need calibration_batches")
    if metrics:
        influences = {**(influences or {}), **influence_results(model, calibration_batches, metrics, progress=progress,
                                                                 shortgpt_compat=shortgpt_compat, source=calibration_source)}
    influences_b = None
    if stability_batches is not None:
        stability_batches = list(stability_batches)
        shared = [m for m in methods if m in METRICS]
        influences_b = influence_results(model, stability_batches, shared, progress=progress,
                                         shortgpt_compat=shortgpt_compat, source=stability_source) if shared else {}
    evaluate = heldout_scorer(eval_batches, eval_source, progress=progress)
    dense = dense if dense is not None else evaluate(model)
    rows = []
    for method in methods:
        if method in BASELINES:
            runs = [removal_for(method, n_remove, n_layers=n_layers, seed=s)
                    for s in (range(seeds) if method == "random" else [0])]
            ppls = [evaluate(remove_layers(model, order)).ppl for order in runs]
            rows.append(RemovalRow(method=f"random (mean of {seeds})" if method == "random" else method,
                                   removed=runs[0] if len(runs) == 1 else None, ppl=statistics.fmean(ppls),
                                   ppl_std=statistics.stdev(ppls) if len(ppls) > 1 else None, ppls=ppls))
            continue
        chosen = choose(model, method, n_remove, calibration_batches, influences=influences, progress=progress,
                        shortgpt_compat=shortgpt_compat, source=calibration_source)
        ppl = evaluate(apply_removal(model, chosen.order)).ppl
        row = RemovalRow(method=method, removed=chosen.to_dict()["order"], ppl=ppl, ppl_std=None, ppls=[ppl],
                         seconds=chosen.seconds)
        if stability_batches is not None:
            other = choose(model, method, n_remove, stability_batches, influences=influences_b, progress=progress,
                           shortgpt_compat=shortgpt_compat, source=stability_source)
            row.removed_b = other.to_dict()["order"]
            row.overlap = overlap(chosen.order, other.order)
            row.rank_correlation = rank_correlation(chosen.scores, other.scores)
        rows.append(row)
    return RemovalComparison(n_layers=n_layers, n_remove=n_remove, dense=dense, rows=rows)
