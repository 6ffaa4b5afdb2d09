"""`residscope rope-bound`: the RoPE base a context length needs, and how far a base (or a model's RoPE) reaches.

JSON fields are documented in docs/rope-bound.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Optional

import typer

from residscope.model.errors import InputError

from .cli_output import json_text


def _lower_bound_json(b) -> dict:
    out = asdict(b)
    out["base_lower_bound"] = out.pop("value")
    return out


def _bound_json(c) -> dict:
    out = asdict(c)
    out["context_bound"] = out.pop("bound")
    return out


def rope_bound(
    head_dim: int = typer.Option(128, "--head-dim", help="head dim d (frequencies theta_i = base^(-2i/d))"),
    length: Optional[int] = typer.Option(None, "--length", help="context length L (up to 2^22 = 4,194,304): print the smallest base keeping B >= 0 on [0, L]"),
    base: Optional[float] = typer.Option(None, "--base", help="RoPE base: print its context bound"),
    table: bool = typer.Option(False, "--table", help="the paper's table (1k .. 1M, head dim 128) next to the published values"),
    model: Optional[str] = typer.Option(None, "--model", help="alias, Hugging Face folder or .gguf: bound per layer kind"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="with --model: length at which dynamic NTK scaling is evaluated"),
    grid_step: float = typer.Option(1e-3, "--grid-step", help="relative spacing of the exhaustive base grid, 1e-5..1"),
    max_m: int = typer.Option(1 << 22, "--max-m", help="largest distance scanned for a context bound, up to 2^28"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (fields: docs/rope-bound.md)"),
    html: Optional[str] = typer.Option(None, "--html", help="also write plotly figures (B(m) curves, bound vs length) to this file"),
) -> None:
    """RoPE base vs context length (Men et al., 2024): B(m) = sum_i cos(m theta_i) must stay >= 0 for every m <= L."""
    chosen = [name for name, v in (("--length", length), ("--base", base), ("--table", table or None), ("--model", model)) if v is not None]
    if len(chosen) != 1:
        raise InputError(f"rope-bound: give exactly one of --length, --base, --table, --model (got {', '.join(chosen) or 'none'})")
    if base is not None and not (base > 1 and math.isfinite(base)):
        raise InputError(f"--base must be a finite number > 1, got {base}")
    if seq_len is not None and model is None:
        raise InputError("--seq-len only applies with --model")

    from residscope.analyses import rope_bound as rb
    from residscope.common.atomic import check_output_file

    # the library's own checks (limits: docs/rope-bound.md), before any work
    rb.check_head_dim(head_dim)
    rb.check_max_m(max_m)
    rb.check_search([length] if length is not None else [], grid_step, 1e-6)
    if html:
        from .cli_common import inputs_of

        check_output_file(html, "--html", inputs=inputs_of(model) if model else ())
    progress = not as_json

    rows, fig_head_dim = None, head_dim
    if length is not None:
        bound = rb.base_lower_bound(length, head_dim, grid_step=grid_step, max_m=max_m, progress=progress)
        bases = _print_lower_bound(bound, length, head_dim, grid_step, as_json)
    elif base is not None:
        bases = _print_context_bound(rb.context_bound(base, head_dim, max_m=max_m), base, head_dim, as_json)
    elif table:
        rows = rb.paper_table(head_dim, grid_step=grid_step, max_m=max_m, progress=progress)
        bases = _print_table(rows, as_json)
    else:
        from residscope.model import load_config

        cfg = load_config(model)
        kinds = rb.model_bounds(cfg, seq_len=seq_len, max_m=max_m)
        bases, fig_head_dim = _print_model_bounds(model, cfg, kinds, as_json), kinds[0].head_dim
    if html:
        from residscope.analyses import rope_bound_plots as plots

        figs = [plots.b_curve_figure(bases, fig_head_dim),
                plots.bound_figure(rows if rows is not None else rb.paper_table(128, lengths=[1 << 10, 1 << 12, 1 << 14]))]
        path = plots.write_html(figs, html)
        if not as_json:
            typer.echo(f"figures written to {path}")


def _print_lower_bound(b, length: int, head_dim: int, grid_step: float, as_json: bool) -> list[float]:
    if as_json:
        typer.echo(json_text(_lower_bound_json(b), indent=1))
    else:
        reach = f">= {b.reach:,}" if b.reach_capped else f"{b.reach:,}"
        typer.echo(f"base lower bound for L={length:,}, head dim {head_dim}: {b.value:.9g}"
                   f"  (verified={b.verified}, margin min B={b.min_value:.3g}, reaches {reach})")
        typer.echo(f"  base {b.below:.9g} just below fails at m={b.below_first_negative:,}; every grid base "
                   f"(1+{grid_step:g})^k below {b.grid_value:.6g} fails. B is not monotone in the base: check a "
                   f"specific base with --base.")
    return [b.below, b.value]


def _print_context_bound(c, base: float, head_dim: int, as_json: bool) -> list[float]:
    if as_json:
        typer.echo(json_text(_bound_json(c), indent=1))
    elif c.capped:
        typer.echo(f"context bound of base {base:g}, head dim {head_dim}: >= {c.bound:,} (B >= 0 up to --max-m)")
    else:
        typer.echo(f"context bound of base {base:g}, head dim {head_dim}: {c.bound:,}  (B first < 0 at m={c.first_negative:,})")
    return [base]


def _print_table(rows, as_json: bool) -> list[float]:
    if as_json:
        typer.echo(json_text([{"length": r.length, "published": r.published, "published_context_bound": r.published_reach.bound
                                if r.published_reach else None, "note": r.note, **_lower_bound_json(r.computed)} for r in rows], indent=1))
    else:
        typer.echo(f"{'length':>9}  {'computed':>11}  {'published':>9}  {'ok':>3}  note")
        for r in rows:
            pub = f"{r.published:.2g}" if r.published is not None else "-"
            typer.echo(f"{r.length:>9,}  {r.computed.value:>11.5g}  {pub:>9}  {'yes' if r.computed.verified else 'NO':>3}  {r.note}")
    return [rows[0].computed.value, rows[len(rows) // 2].computed.value]


def _print_model_bounds(model: str, cfg, kinds, as_json: bool) -> list[float]:
    if as_json:
        typer.echo(json_text([{**asdict(k), "context_bound": k.bound.bound, "capped": k.bound.capped,
                                "covers_max_positions": k.covers_max_positions} for k in kinds], indent=1))
    else:
        typer.echo(f"{model}: max positions {cfg.max_position_embeddings}")
        for k in kinds:
            scaling = "none" if k.rope_type == "default" else f"{k.rope_type} x{k.factor:g}"
            bound = f">= {k.bound.bound:,}" if k.bound.capped else f"{k.bound.bound:,}"
            window = f", window {k.sliding_window}" if k.sliding_window else ""
            typer.echo(f"  {k.layer_kind} ({len(k.layers)} layers{window}): head dim {k.head_dim}, rotary dim {k.rotary_dim}, "
                       f"base {k.base:g}, scaling {scaling}: context bound {bound} -> "
                       f"{'covers' if k.covers_max_positions else 'does NOT cover'} the positions it can see")
        if cfg.no_rope:
            typer.echo(f"  layers {list(cfg.no_rope)} apply no rotary position (NoPE): no bound")
    return [k.base for k in kinds]


def register(app: typer.Typer) -> None:
    app.command("rope-bound")(rope_bound)
