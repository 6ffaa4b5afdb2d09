"""Figures of `cut_lens.CutComparison`: the dense and the pruned model block by block, at original layer indices."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def cut_figure(c, *, title: str | None = None) -> go.Figure:
    """Three panels over the original block index: logit-lens agreement with the final prediction, sink mass, and the
    first token's norm ratio; dense as a line, pruned as markers (gaps where blocks were removed, shaded)."""
    blocks = list(range(c.n_layers))
    panels = [("logit lens = final top-1", c.lens_agreement_dense, c.lens_agreement_pruned),
              ("sink mass (first keys)", c.sink_mass_dense, c.sink_mass_pruned),
              ("first-token norm / median", c.first_token_ratio_dense, c.first_token_ratio_pruned)]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[p[0] for p in panels], horizontal_spacing=0.07)
    for col, (name, dense, pruned) in enumerate(panels, start=1):
        fig.add_trace(go.Scatter(x=blocks, y=dense, mode="lines+markers", name="dense", legendgroup="dense",
                                 showlegend=col == 1, line=dict(color="#1f77b4")), row=1, col=col)
        fig.add_trace(go.Scatter(x=blocks, y=pruned, mode="markers", name="pruned", legendgroup="pruned",
                                 showlegend=col == 1, marker=dict(color="#d62728", size=8, symbol="diamond")),
                      row=1, col=col)
        if col == 2:
            fig.add_trace(go.Scatter(x=blocks, y=c.lens_agreement_pruned_vs_dense, mode="markers",
                                     name="pruned lens = dense final", marker=dict(color="#ff7f0e", size=6)),
                          row=1, col=1)
        for r in c.removed:
            fig.add_vrect(x0=r - 0.5, x1=r + 0.5, fillcolor="grey", opacity=0.15, line_width=0, row=1, col=col)
        fig.update_xaxes(title_text="original block", row=1, col=col)
    fig.update_layout(template="plotly_white", height=380,
                      title=title or (f"The cut: removed blocks {c.removed} (shaded); final top-1 agreement "
                                      f"{c.final_top1_agreement:.2f}, perplexity {c.ppl_dense:.2f} -> {c.ppl_pruned:.2f}"))
    return fig
