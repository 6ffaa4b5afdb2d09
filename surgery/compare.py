"""Which layers to cut: held-out perplexity after removing the same number of layers by each metric and baseline
(ShortGPT's comparison), and the single choice that a pruning run makes.

    cmp = compare_removals(model, 4, eval_batches, calibration_batches=calib, seeds=5)
    for row in cmp.rows:
        print(row.method, row.ppl / cmp.dense.ppl)

Every candidate is scored on the same held-out batches; metrics share their Block Influence passes
(`influence_results`), and the random baseline is averaged over seeds 0..seeds-1.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from residscope.analyses.perplexity import PerplexityResult, perplexity
from residscope.common.batches import Batch
from residscope.model.errors import InputError

from .influence import BASELINES, METRICS, InfluenceResult, influence_results, removal_order
from .removal import remove_layers


@dataclass
class RemovalRow:
    method: str  # a metric, a baseline, or "random (mean of N)"
    removed: list[int] | None  # layers removed, in removal order; None for the seeded random baseline
    ppl: float  # held-out perplexity after removal (mean over seeds for random)
    ppl_std: float | None  # spread over seeds (random with 2 or more seeds), else None
    ppls: list[float] = field(default_factory=list)  # one per run


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


def compare_removals(model, n_remove: int, eval_batches: Sequence[Batch], *,
                     calibration_batches: Iterable[Batch] | None = None, methods: Sequence[str] = METRICS + BASELINES,
                     influences: dict[str, InfluenceResult] | None = None, seeds: int = 5, shortgpt_compat: bool = False,
                     eval_source: str | None = None, calibration_source: str | None = None,
                     dense: PerplexityResult | None = None, progress: bool = False) -> RemovalComparison:
    """Held-out perplexity of `model` with `n_remove` layers removed by each method (metrics from `influences`, or
    computed on `calibration_batches`; baselines; random averaged over `seeds` seeds), beside the dense model's."""
    n_layers = len(model.blocks)
    unknown = [m for m in methods if m not in METRICS + BASELINES]
    if unknown:
        raise InputError(f"methods: unknown {unknown} (choose from {', '.join(METRICS + BASELINES)})")
    if not 0 < n_remove < n_layers:
        raise InputError(f"n_remove must be between 1 and {n_layers - 1} for this {n_layers}-layer model; got {n_remove}")
    if seeds < 1:
        raise InputError(f"seeds must be >= 1, got {seeds}")
    metrics = [m for m in methods if m in METRICS and m not in (influences or {})]
    if metrics:
        if calibration_batches is None:
            raise InputError(f"metrics {metrics} need calibration_batches (or influences)")
        influences = {**(influences or {}), **influence_results(model, calibration_batches, metrics, progress=progress,
                                                                 shortgpt_compat=shortgpt_compat, source=calibration_source)}
    evaluate = heldout_scorer(eval_batches, eval_source, progress=progress)
    dense = dense if dense is not None else evaluate(model)
    rows = []
    for method in methods:
        runs = [removal_for(method, n_remove, n_layers=n_layers, influences=influences, seed=s)
                for s in (range(seeds) if method == "random" else [0])]
        ppls = [evaluate(remove_layers(model, order)).ppl for order in runs]
        rows.append(RemovalRow(method=f"random (mean of {seeds})" if method == "random" else method,
                               removed=runs[0] if len(runs) == 1 else None, ppl=statistics.fmean(ppls),
                               ppl_std=statistics.stdev(ppls) if len(ppls) > 1 else None, ppls=ppls))
    return RemovalComparison(n_layers=n_layers, n_remove=n_remove, dense=dense, rows=rows)
