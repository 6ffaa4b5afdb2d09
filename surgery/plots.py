"""Plotly figures for layer-importance scores and pruning comparisons (computation lives in influence.py)."""

from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go

from .influence import InfluenceResult, removal_order

_LABELS = {
    "bi": "Block Influence (1 - mean cos)",
    "angular": "angular distance (arccos(cos)/π)",
    "relative-magnitude": "relative magnitude ||f(x)|| / ||x + f(x)||",
    "attn-bi": "attention Block Influence",
    "mlp-bi": "MLP Block Influence",
}


def influence_figure(result: InfluenceResult, *, highlight: int | None = None, title: str | None = None,
                     log_y: bool = False) -> go.Figure:
    """Bar chart of per-layer scores; the `highlight` lowest-scoring layers (the ones removed first) are drawn in red
    and annotated with their removal rank."""
    scores = result.scores.tolist()
    n = len(scores)
    removed = removal_order(result, highlight) if highlight else []
    rank = {layer: r + 1 for r, layer in enumerate(removed)}
    colors = ["#d62728" if i in rank else "#1f77b4" for i in range(n)]
    hover = [
        f"layer {i}<br>score {s:.5f}" + (f"<br>removed #{rank[i]}" if i in rank else "")
        + (f"<br>mean cos {result.mean_cos[i]:.5f}" if result.mean_cos is not None else "")
        for i, s in enumerate(scores)
    ]
    fig = go.Figure(go.Bar(x=list(range(n)), y=scores, marker_color=colors, hovertext=hover, hoverinfo="text",
                           text=[f"#{rank[i]}" if i in rank else "" for i in range(n)], textposition="outside"))
    label = _LABELS.get(result.metric, result.metric)
    subtitle = f"{result.n_tokens} tokens" + (f", {result.source}" if result.source else "")
    if result.shortgpt_compat:
        subtitle += ", ShortGPT reference-code compatible"
    fig.update_layout(
        title=title or f"{label} per layer<br><sup>{subtitle}</sup>",
        xaxis_title="layer", yaxis_title=result.metric, template="plotly_white", bargap=0.15,
    )
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def comparison_figure(rows: Sequence[dict], *, dense_ppl: float | None = None, title: str | None = None) -> go.Figure:
    """Held-out perplexity after removal by each method: rows of {"method", "ppl", optional "ppl_std"}."""
    methods = [r["method"] for r in rows]
    ppl = [r["ppl"] for r in rows]
    err = [r.get("ppl_std") or 0.0 for r in rows]
    fig = go.Figure(go.Bar(x=methods, y=ppl, error_y=dict(type="data", array=err, visible=any(err))))
    if dense_ppl is not None:
        fig.add_hline(y=dense_ppl, line_dash="dash", annotation_text=f"dense {dense_ppl:.2f}")
    fig.update_layout(title=title or "held-out perplexity after layer removal", yaxis_title="perplexity", yaxis_type="log",
                      template="plotly_white")
    return fig
