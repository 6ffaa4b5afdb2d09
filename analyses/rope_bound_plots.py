"""Plotly figures for the RoPE base / context-length bound (computation lives in `rope_bound`)."""

from __future__ import annotations

from pathlib import Path

import torch

from residscope.model.errors import InputError

from .rope_bound import PUBLISHED_BASE_LOWER_BOUNDS, TableRow, rope_sum


def b_curve_figure(bases: list[float], head_dim: int = 128, max_m: int = 1 << 16, points: int = 4000):
    """B(m) against m for a few bases, with the zero line (log-spaced integer m, so both short and long range show)."""
    import plotly.graph_objects as go

    m = torch.unique(torch.logspace(0, torch.log10(torch.tensor(float(max_m))), points).round().long())  # [P]
    fig = go.Figure()
    for base in bases:
        fig.add_trace(go.Scatter(x=m.numpy(), y=rope_sum(m, base, head_dim).numpy(), mode="lines", name=f"base {base:.3g}"))
    fig.add_hline(y=0, line_dash="dash", line_color="black")
    fig.update_layout(title=f"B(m) = sum_i cos(m theta_i), head dim {head_dim}", xaxis_title="relative distance m",
                      yaxis_title="B(m)", xaxis_type="log")
    return fig


def bound_figure(rows: list[TableRow]):
    """Lower bound of the base against context length, log axes, ours next to the published points."""
    import plotly.graph_objects as go

    lengths = [r.length for r in rows]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=lengths, y=[r.computed.value for r in rows], mode="lines+markers", name="computed (verified)"))
    published = [(r.length, r.published) for r in rows if r.published is not None]
    if published:
        fig.add_trace(go.Scatter(x=[p[0] for p in published], y=[p[1] for p in published], mode="markers",
                                 marker_symbol="x", marker_size=10, name="published (Men et al., 2024)"))
    fig.update_layout(title=f"Lower bound of the RoPE base, head dim {rows[0].computed.head_dim}",
                      xaxis_title="context length L", yaxis_title="base", xaxis_type="log", yaxis_type="log")
    return fig


def write_html(figures: list, path: str | Path) -> Path:
    """All figures in one self-contained HTML file (plotly.js inlined: works offline), written atomically."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"html: folder {path.parent} does not exist")
    parts = [fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False) for i, fig in enumerate(figures)]
    html = "<html><head><meta charset='utf-8'><title>residscope rope-bound</title></head><body>" + "".join(parts) + "</body></html>"
    from residscope.common.atomic import atomic_write_text

    return atomic_write_text(path, html)


__all__ = ["b_curve_figure", "bound_figure", "write_html", "PUBLISHED_BASE_LOWER_BOUNDS"]
