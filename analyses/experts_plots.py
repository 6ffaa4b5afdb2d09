"""Plotly figures for the expert analyses (analyses/experts.py) and expert pruning curves. Pure functions from result
dataclasses to `plotly.graph_objects.Figure`; the CLI, notebooks and the explorer show them."""

from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .experts import ExpertAttribution, RoutingStats


def load_heatmap(st: RoutingStats) -> go.Figure:
    """Each expert's share of the routed slots, per MoE layer (uniform: 1 / n_experts)."""
    fig = go.Figure(go.Heatmap(z=st.load.numpy(), y=[str(i) for i in st.layers], colorscale="Viridis",
                               colorbar=dict(title="load"),
                               hovertemplate="layer %{y}, expert %{x}: %{z:.3f} of routed slots<extra></extra>"))
    fig.update_layout(title=f"Expert load (uniform = {1 / st.n_experts:.3f})", xaxis_title="expert",
                      yaxis_title="layer", yaxis_type="category")
    return fig


def routing_summary(st: RoutingStats) -> go.Figure:
    """Per layer: router entropy (vs log E), top-k probability mass, load imbalance (1 = balanced), shared gate."""
    panels = 4 if st.shared_gate_mean is not None else 3
    titles = ["router entropy (nats)", "top-k probability mass", "load imbalance E·Σ f·P"]
    if panels == 4:
        titles.append("mean shared-expert gate")
    fig = make_subplots(rows=1, cols=panels, subplot_titles=titles)
    x = st.layers
    series = [st.entropy, st.topk_mass, st.imbalance] + ([st.shared_gate_mean] if panels == 4 else [])
    for col, y in enumerate(series, 1):
        fig.add_trace(go.Scatter(x=x, y=y.tolist(), mode="lines+markers", showlegend=False), row=1, col=col)
        fig.update_xaxes(title_text="layer", row=1, col=col)
    fig.update_layout(title="Routing per layer")
    return fig


def position_heatmap(st: RoutingStats, layer_row: int) -> go.Figure:
    """Load by position bucket in one MoE layer (OpenMoE: routing drifts late in the sequence)."""
    edges = st.position_edges
    labels = [f"{edges[b]}-{edges[b + 1] - 1}" for b in range(len(edges) - 1)]
    fig = go.Figure(go.Heatmap(z=st.position_load[layer_row].numpy(), y=labels, colorscale="Viridis",
                               colorbar=dict(title="load")))
    fig.update_layout(title=f"Routing by position, layer {st.layers[layer_row]}", xaxis_title="expert",
                      yaxis_title="positions", yaxis_type="category")
    return fig


def attribution_heatmap(attr: ExpertAttribution) -> go.Figure:
    """Mean direct logit attribution to the next token of each expert, per MoE layer."""
    z = attr.per_expert.numpy()
    bound = float(abs(z).max()) or 1.0
    fig = go.Figure(go.Heatmap(z=z, y=[str(i) for i in attr.layers], colorscale="RdBu", zmid=0, zmin=-bound,
                               zmax=bound, colorbar=dict(title="logit")))
    fig.update_layout(title="Expert logit attribution (next token, mean per token)", xaxis_title="expert",
                      yaxis_title="layer", yaxis_type="category")
    return fig


def pruning_curves(rows: Sequence[dict], dense_ppl: float) -> go.Figure:
    """Held-out perplexity against experts kept, one line per criterion; rows: {criterion, keep, ppl}."""
    fig = go.Figure()
    for criterion in dict.fromkeys(r["criterion"] for r in rows):
        pts = sorted((r["keep"], r["ppl"]) for r in rows if r["criterion"] == criterion)
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=criterion))
    fig.add_hline(y=dense_ppl, line_dash="dot", annotation_text="all experts")
    fig.update_layout(title="Expert pruning: held-out perplexity vs experts kept", xaxis_title="experts kept per layer",
                      yaxis_title="perplexity", yaxis_type="log")
    return fig
