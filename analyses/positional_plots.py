"""Plotly figures for the positional analyses. Pure functions from result dataclasses to `plotly.graph_objects.Figure`;
the CLI writes them as HTML, notebooks and the Streamlit explorer show them directly."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .positional import AttentionStatistics, PositionalDescription, RemovalRow


def _layer_slider(frames_title: str, layers: Sequence[int]) -> list[dict]:
    steps = [dict(method="update", label=str(layer),
                  args=[{"visible": [i == j for j in range(len(layers))]}, {"title": f"{frames_title}, layer {layer}"}])
             for i, layer in enumerate(layers)]
    return [dict(active=0, currentvalue=dict(prefix="layer "), steps=steps)]


def norms_heatmap(desc: PositionalDescription) -> go.Figure:
    """||p[l, t]|| over layers and positions (log colour scale: the first tokens' vectors dwarf the rest)."""
    z = np.log10(np.maximum(desc.vector_norms, 1e-12))
    fig = go.Figure(go.Heatmap(z=z, colorscale="Viridis", colorbar=dict(title="log10 ||p||"),
                               hovertemplate="layer %{y}, position %{x}: log10 ||p|| = %{z:.2f}<extra></extra>"))
    fig.update_layout(title="Norm of the positional vectors", xaxis_title="position", yaxis_title="layer (0 = embeddings)")
    return fig


def similarity_matrices(desc: PositionalDescription) -> go.Figure:
    """Cosine similarity between positional vectors, one layer at a time (slider)."""
    layers = list(range(desc.similarity.shape[0]))
    fig = go.Figure([go.Heatmap(z=desc.similarity[layer], zmin=-1, zmax=1, colorscale="RdBu", reversescale=True,
                                visible=layer == 0, colorbar=dict(title="cos"),
                                hovertemplate="positions %{y}, %{x}: cos %{z:.3f}<extra></extra>") for layer in layers])
    fig.update_layout(title="Cosine similarity of positional vectors, layer 0", sliders=_layer_slider(
        "Cosine similarity of positional vectors", layers), xaxis_title="position", yaxis_title="position",
        yaxis_autorange="reversed")
    return fig


def pca_trajectories(desc: PositionalDescription) -> go.Figure:
    """The positional vectors of each layer on their first two principal components, coloured by position (slider)."""
    layers = list(range(desc.pca_coords.shape[0]))
    seq_len = desc.pca_coords.shape[1]
    traces = []
    for layer in layers:
        c = desc.pca_coords[layer]
        y = c[:, 1] if c.shape[1] > 1 else np.zeros(seq_len)
        traces.append(go.Scatter(x=c[:, 0], y=y, mode="lines+markers", visible=layer == 0,
                                 marker=dict(color=np.arange(seq_len), colorscale="Plasma", showscale=True,
                                             colorbar=dict(title="position")),
                                 line=dict(color="lightgrey"), text=[f"position {t}" for t in range(seq_len)],
                                 name=f"layer {layer}"))
    fig = go.Figure(traces)
    ev = desc.pca_explained
    fig.update_layout(title="PCA of positional vectors, layer 0", xaxis_title="PC1", yaxis_title="PC2",
                      sliders=_layer_slider("PCA of positional vectors", layers))
    fig.add_annotation(text="explained variance per layer (PC1, PC2): " + ", ".join(
        f"{layer}: {ev[layer, :2].round(2).tolist()}" for layer in layers[:: max(1, len(layers) // 8)]),
        showarrow=False, xref="paper", yref="paper", x=0, y=-0.18, font=dict(size=10))
    return fig


def layer_summary(desc: PositionalDescription) -> go.Figure:
    """Per layer: first-token norm over the median token norm, number of distinct positional vectors, positional share."""
    layers = np.arange(desc.vector_norms.shape[0])
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, subplot_titles=(
        "token norm of the first tokens / median token norm", f"distinct positional vectors (cos >= {desc.cos_threshold})",
        "positional share of the residual stream"))
    for k in range(desc.first_token_ratio.shape[1]):
        fig.add_trace(go.Scatter(x=layers, y=desc.first_token_ratio[:, k], name=f"token {k}", mode="lines+markers"), 1, 1)
    fig.add_trace(go.Bar(x=layers, y=desc.n_distinct, name="distinct vectors"), 2, 1)
    fig.add_trace(go.Scatter(x=layers, y=desc.positional_share, name="||p||² / E||h||²"), 3, 1)
    fig.add_trace(go.Scatter(x=layers, y=desc.positional_r2, name="R² of position (mean removed)"), 3, 1)
    fig.add_trace(go.Scatter(x=layers, y=desc.positional_r2_after_first_k, name=f"R² of position, t >= {desc.first_k}"),
                  3, 1)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_xaxes(title_text="layer (0 = embeddings)", row=3, col=1)
    fig.update_layout(title="Positional vectors by layer", height=850)
    return fig


def sink_mass(stats: AttentionStatistics) -> go.Figure:
    """Attention mass on the first k tokens, per block and head."""
    fig = go.Figure(go.Heatmap(z=stats.sink_mass, zmin=0, zmax=1, colorscale="Viridis", colorbar=dict(title="mass"),
                               hovertemplate="block %{y}, head %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"Attention mass on the first {stats.first_k} tokens (queries at positions >= {stats.first_k})",
                      xaxis_title="head", yaxis_title="block")
    return fig


def attention_by_distance(stats: AttentionStatistics) -> go.Figure:
    """Mean attention against query-key distance, averaged over heads, one line per block (log y)."""
    fig = go.Figure()
    n = stats.by_distance.shape[0]
    for layer in range(n):
        fig.add_trace(go.Scatter(y=stats.by_distance[layer].mean(0), name=f"block {layer}", mode="lines",
                                 line=dict(color=f"hsl({int(270 * layer / max(1, n - 1))},70%,45%)")))
    fig.update_layout(title="Mean attention against distance (mean over heads)", xaxis_title="distance q - k",
                      yaxis_title="attention", yaxis_type="log")
    return fig


def removal_effects(rows: Sequence[RemovalRow]) -> go.Figure:
    """Perplexity, sink mass and decay ratio per block with positional vectors removed (the paper's Table 2)."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("perplexity", "sink mass by block", "decay ratio by block"))
    for r in rows:
        fig.add_trace(go.Bar(x=[r.label], y=[r.ppl], name=r.label, showlegend=False), 1, 1)
        fig.add_trace(go.Scatter(y=r.sink_mass, name=r.label, mode="lines+markers", legendgroup=r.label), 1, 2)
        fig.add_trace(go.Scatter(y=r.decay_ratio, name=r.label, mode="lines", legendgroup=r.label, showlegend=False), 1, 3)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=3)
    fig.update_layout(title="Removing positional vectors", height=450)
    return fig


def probe_scores(results: Sequence) -> go.Figure:
    """Probe score per layer against its shuffled-label control, one panel per target (`probes.linear.ProbeScores`)."""
    fig = make_subplots(rows=1, cols=max(1, len(results)), subplot_titles=[f"{r.target} ({r.metric})" for r in results])
    for i, r in enumerate(results, 1):
        fig.add_trace(go.Scatter(x=r.layers, y=r.score, name=f"{r.target}: probe", mode="lines+markers"), 1, i)
        fig.add_trace(go.Scatter(x=r.layers, y=r.control, name=f"{r.target}: shuffled labels", mode="lines",
                                 line=dict(dash="dash")), 1, i)
        fig.update_xaxes(title_text="layer (0 = embeddings)", row=1, col=i)
    fig.update_layout(title="Linear probes by layer (split by sample)")
    return fig


def study_figures(study, probes: Sequence = ()) -> dict[str, go.Figure]:
    """Every figure of a `PositionalStudy` (and its probes, if any), by the file name `residscope positional` gives it."""
    desc, att = study.description, study.attention
    figures = {"norms.html": norms_heatmap(desc), "similarity.html": similarity_matrices(desc),
               "pca.html": pca_trajectories(desc), "layers.html": layer_summary(desc),
               "sinks.html": sink_mass(att), "distance.html": attention_by_distance(att)}
    if study.removal:
        figures["removal.html"] = removal_effects(study.removal)
    if probes:
        figures["probes.html"] = probe_scores(probes)
    return figures
