"""Plotly heat maps and a text table of RULER scores (computation lives in `ruler.py`)."""

from __future__ import annotations


def _fmt_depth(depth: float) -> str:
    return f"depth {depth:g}"


def ruler_figure(result, *, title: str = "RULER synthetic tasks"):
    """Two heat maps, score (percent) by length: tasks (mean over depths, plus RULER's average over tasks) and depths
    (mean over the needle tasks and vt)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    lengths = sorted({c.length for c in result.cells})
    tasks = list(dict.fromkeys(c.task for c in result.cells))
    by_task, by_length = result.task_scores(), result.length_scores()
    z_tasks = [[by_task.get((t, n)) for n in lengths] for t in tasks] + [[by_length.get(n) for n in lengths]]
    rows_tasks = tasks + ["average"]
    by_depth = result.depth_scores()
    depths = sorted({d for d, _ in by_depth})
    z_depths = [[by_depth.get((d, n)) for n in lengths] for d in depths]
    x = [str(n) for n in lengths]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.18,
                        subplot_titles=("by task (mean over depths)", "by depth (needle tasks and vt)"))
    common = dict(x=x, zmin=0, zmax=100, colorscale="RdYlGn", texttemplate="%{z:.0f}", hoverongaps=False)
    fig.add_trace(go.Heatmap(z=z_tasks, y=rows_tasks, colorbar=dict(title="score %"), **common), row=1, col=1)
    if depths:
        fig.add_trace(go.Heatmap(z=z_depths, y=[_fmt_depth(d) for d in depths], showscale=False, **common), row=1, col=2)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(title_text="length (tokens)", type="category")
    fig.update_layout(title=f"{title} ({result.method}, {result.samples} samples per cell, seed {result.seed})",
                      template="plotly_white", height=max(360, 28 * len(rows_tasks) + 160))
    return fig


def ruler_table(result) -> str:
    """Tasks as rows, lengths as columns (score in percent), the average over tasks last."""
    lengths = sorted({c.length for c in result.cells})
    tasks = list(dict.fromkeys(c.task for c in result.cells))
    by_task, by_length = result.task_scores(), result.length_scores()
    lines = ["task".ljust(18) + "".join(f"{n:>9}" for n in lengths)]
    for t in tasks:
        lines.append(t.ljust(18) + "".join(f"{by_task[t, n]:>9.1f}" for n in lengths))
    lines.append("average".ljust(18) + "".join(f"{by_length[n]:>9.1f}" for n in lengths))
    by_depth = result.depth_scores()
    for d in sorted({d for d, _ in by_depth}):
        lines.append(f"  at depth {d:g}".ljust(18) + "".join(f"{by_depth[d, n]:>9.1f}" for n in lengths))
    return "\n".join(lines)
