"""Plotly figures and text tables for context-window extension (computation lives in `extension.py`)."""

from __future__ import annotations

from typing import Sequence


def perplexity_figure(rows: Sequence, *, title: str = "Perplexity against length", window: int | None = None):
    """One line per method: sliding-window perplexity (log scale) against evaluation length. rows: LengthPerplexity."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for method in dict.fromkeys(r.method for r in rows):
        mine = sorted((r for r in rows if r.method == method), key=lambda r: r.length)
        fig.add_trace(go.Scatter(x=[r.length for r in mine], y=[r.ppl for r in mine], mode="lines+markers", name=method))
    if window is not None:
        fig.add_vline(x=window, line_dash="dot", annotation_text="trained window")
    fig.update_layout(title=title, xaxis_title="evaluation length (tokens)", yaxis_title="perplexity", template="plotly_white")
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return fig


def passkey_figure(rows: Sequence, *, title: str = "Passkey retrieval accuracy"):
    """Accuracy against length, one line per method (averaged over depths). rows: PasskeyRow."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for method in dict.fromkeys(r.method for r in rows):
        lengths = sorted({r.length for r in rows if r.method == method})
        acc = [sum(r.accuracy for r in rows if r.method == method and r.length == n) /
               sum(1 for r in rows if r.method == method and r.length == n) for n in lengths]
        fig.add_trace(go.Scatter(x=lengths, y=acc, mode="lines+markers", name=method))
    fig.update_layout(title=title, xaxis_title="prompt length (tokens)", yaxis_title="exact-match accuracy",
                      yaxis_range=[-0.05, 1.05], template="plotly_white")
    fig.update_xaxes(type="log")
    return fig


def perplexity_table(rows: Sequence) -> str:
    """Methods as rows, lengths as columns."""
    lengths = sorted({r.length for r in rows})
    methods = list(dict.fromkeys(r.method for r in rows))
    ppl = {(r.method, r.length): r.ppl for r in rows}
    lines = ["method".ljust(12) + "".join(f"{n:>10}" for n in lengths)]
    for m in methods:
        lines.append(m.ljust(12) + "".join(f"{ppl[(m, n)]:>10.2f}" if (m, n) in ppl else f"{'-':>10}" for n in lengths))
    return "\n".join(lines)


def passkey_table(rows: Sequence) -> str:
    """Methods x lengths, accuracy averaged over depths (and the per-depth values in brackets)."""
    lengths = sorted({r.length for r in rows})
    methods = list(dict.fromkeys(r.method for r in rows))
    lines = ["method".ljust(12) + "".join(f"{n:>22}" for n in lengths)]
    for m in methods:
        cells = []
        for n in lengths:
            mine = [r for r in rows if r.method == m and r.length == n]
            if not mine:
                cells.append(f"{'-':>22}")
                continue
            mean = sum(r.accuracy for r in mine) / len(mine)
            cells.append(f"{mean:.2f} [{' '.join(f'{r.accuracy:.1f}' for r in mine)}]".rjust(22))
        lines.append(m.ljust(12) + "".join(cells))
    return "\n".join(lines)
