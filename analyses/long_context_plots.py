"""Plotly figures of long-context statistics (analyses/long_context.py): pure functions from the result dataclass to
figures, shared by the CLI, the explorer and notebooks."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from residscope.model.errors import InputError

from .long_context import LongContextStatistics


def _binned(x: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres, means) of a [pos] series in `bins` equal bins (so 32k points plot as a few hundred)."""
    parts = np.array_split(np.arange(len(x)), min(bins, len(x)))
    return np.array([p.mean() for p in parts]), np.array([x[p].mean() for p in parts])


def statistics_figure(stats: LongContextStatistics, *, title: str | None = None, bins: int = 256) -> go.Figure:
    """Four panels: per layer (mean over heads) sink mass, entropy and attended distance; loss against position."""
    fig = make_subplots(rows=2, cols=2, subplot_titles=(
        f"attention on the first {stats.first_k} tokens", "attention entropy (nats)", "mean attended distance (tokens)",
        "next-token loss against position"))
    layers = stats.layers
    for (r, c), values in (((1, 1), stats.sink_mass), ((1, 2), stats.entropy), ((2, 1), stats.mean_distance)):
        if values is None:  # not among the statistics computed
            continue
        fig.add_trace(go.Bar(x=layers, y=values.mean(-1), showlegend=False,
                             hovertemplate="block %{x}: %{y:.3f}<extra></extra>"), row=r, col=c)
        fig.update_xaxes(title_text="block", row=r, col=c)
    x, y = _binned(stats.loss_by_position, bins)
    fig.add_trace(go.Scatter(x=x + 1, y=y, mode="lines", showlegend=False,
                             hovertemplate="position %{x:.0f}: loss %{y:.3f}<extra></extra>"), row=2, col=2)
    fig.update_xaxes(title_text="position", row=2, col=2)
    fig.update_layout(title=title or f"Attention and loss at {stats.seq_len:,} tokens ({stats.n_samples} samples)",
                      height=700)
    return fig


def by_position_figure(stats: LongContextStatistics, which: str = "sink", *, bins: int = 256) -> go.Figure:
    """One statistic (sink, entropy or distance; mean over heads) against query position, one line per block."""
    series = {"sink": stats.sink_by_position, "entropy": stats.entropy_by_position,
              "distance": stats.distance_by_position}[which]
    if series is None:
        raise InputError(f"which: {which!r} was not among the statistics computed")
    fig = go.Figure()
    for row, layer in zip(series, stats.layers):
        x, y = _binned(row, bins)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"block {layer}"))
    fig.update_layout(title=f"{which} against query position", xaxis_title="query position", yaxis_title=which)
    return fig
