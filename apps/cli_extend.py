"""`residscope extend` (sliding-window perplexity against length per extension method) and `residscope passkey`
(passkey retrieval against length and depth). Methods: none, pi, ntk, dynamic-ntk, yarn, pv-replace, window."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from residscope.model.errors import InputError

from .cli_common import DEVICE, DTYPE, MODEL, load, model_name, parse_fractions, parse_lengths, write_figure
from .cli_output import json_text


# options both commands take, with the same meaning
METHOD = typer.Option(None, "--method", help="none, pi, ntk, dynamic-ntk, yarn, pv-replace or window")
COMPARE = typer.Option(False, "--compare", help="every method that applies to the model (or --methods): one table, one figure")
METHODS = typer.Option(None, "--methods", help="with --compare: comma-separated methods")
FACTOR = typer.Option(None, "--factor", help="extension factor s (default: longest length / trained window)")
WINDOW = typer.Option(None, "--window", help="trained window (default: max_position_embeddings of the config)")
RATIO = typer.Option(None, "--ratio", help="pv-replace: interpolation ratio r (default: factor)")
ALPHA = typer.Option(None, "--alpha", help="pv-replace: scale of the new positional vectors (default 1)")
LAYER = typer.Option(None, "--layer", help="pv-replace: residual layer (0 = embeddings; default n_layers // 4)")
LOGIT_SCALE = typer.Option(None, "--logit-scale", help="window: lambda (default ln(sW) / ln(W))")


def _methods(model, method: Optional[str], methods: Optional[str], compare: bool) -> list[str]:
    from residscope.analyses.extension import METHODS, applicable_methods

    if compare:
        chosen = applicable_methods(model) if methods is None else [m.strip() for m in methods.split(",") if m.strip()]
    else:
        chosen = [method or "none"]
    for m in chosen:
        if m not in METHODS:
            raise InputError(f"--method: unknown method {m!r} (choose from {', '.join(METHODS)})")
    return chosen


def _method_kw(window, ratio, alpha, layer, logit_scale) -> dict[str, dict]:
    """Keyword arguments of apply_method per method, from the CLI options (only those each method takes)."""
    from residscope.analyses.extension import METHODS, method_options

    return {m: method_options(m, window=window, ratio=ratio, alpha=alpha, layer=layer, logit_scale=logit_scale)
            for m in METHODS}


def _checked_model(model: Optional[str], device: str, dtype: str, factor: Optional[float], window: Optional[int],
                   html: Optional[Path]):
    """(model, its name, trained window, --html path): the options both commands check before loading, then the load."""
    from residscope.analyses.extension import check_factor, check_window, trained_window
    from residscope.common.atomic import check_output_file

    check_factor(factor)
    check_window(window)
    if html is not None:
        html = check_output_file(html, "--html")  # before the slow part
    m = load(model, device, dtype)
    return m, model_name(model), trained_window(m, window), html


def _lengths(lengths: Optional[str], window: int) -> list[int]:
    return parse_lengths(lengths, "--lengths") if lengths else [window, 2 * window, 4 * window, 8 * window]


def extend(
    model: Optional[str] = MODEL,
    method: Optional[str] = METHOD,
    compare: bool = COMPARE,
    methods: Optional[str] = METHODS,
    factor: Optional[float] = FACTOR,
    lengths: Optional[str] = typer.Option(None, "--lengths", help="comma-separated evaluation lengths (default: 1x,2x,4x,8x the window)"),
    window: Optional[int] = WINDOW,
    ratio: Optional[float] = RATIO,
    alpha: Optional[float] = ALPHA,
    layer: Optional[int] = LAYER,
    logit_scale: Optional[float] = LOGIT_SCALE,
    max_tokens: int = typer.Option(8192, "--max-tokens", help="evaluation-split tokens read (0 = all)"),
    stride: Optional[int] = typer.Option(None, "--stride", help="window stride (default: half the length)"),
    batch_size: int = typer.Option(4, "--batch-size"),
    html: Optional[Path] = typer.Option(None, "--html", help="write the plotly figure (perplexity against length) here"),
    as_json: bool = typer.Option(False, "--json", help='print {"results": [{"method", "length", "ppl", ...}]}'),
    dtype: str = DTYPE,
    device: str = DEVICE,
) -> None:
    """Sliding-window perplexity of the held-out split against length, for one extension method or a comparison."""
    from residscope.analyses.extension import extension_perplexity
    from residscope.analyses.extension_plots import perplexity_figure, perplexity_table

    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    m, model, w, html = _checked_model(model, device, dtype, factor, window, html)
    rows = extension_perplexity(m, _methods(m, method, methods, compare), _lengths(lengths, w), factor=factor, window=window,
                                max_tokens=max_tokens or None, stride=stride, batch_size=batch_size, progress=not as_json,
                                method_kw=_method_kw(window, ratio, alpha, layer, logit_scale))
    if html is not None:
        write_figure(perplexity_figure(rows, title=f"{model}: sliding-window perplexity against length", window=w), html)
    if as_json:
        print(json_text({"model": model, "window": w, "results": [r.to_dict() for r in rows]}, indent=2))
    else:
        print(f"{model} (trained window {w}), sliding-window perplexity of the evaluation split")
        print(perplexity_table(rows))
        if html is not None:
            print(f"figure: {html}")


def passkey(
    model: Optional[str] = MODEL,
    method: Optional[str] = METHOD,
    compare: bool = COMPARE,
    methods: Optional[str] = METHODS,
    factor: Optional[float] = FACTOR,
    lengths: Optional[str] = typer.Option(None, "--lengths", help="comma-separated prompt lengths (default: 1x,2x,4x,8x the window)"),
    depths: str = typer.Option("0,0.5,1", "--depths", help="comma-separated depths of the key in [0, 1]"),
    keys: int = typer.Option(5, "--keys", help="random 5-digit keys per length and depth"),
    seed: int = typer.Option(1234, "--seed", help="seed of the keys"),
    window: Optional[int] = WINDOW,
    ratio: Optional[float] = RATIO,
    alpha: Optional[float] = ALPHA,
    layer: Optional[int] = LAYER,
    logit_scale: Optional[float] = LOGIT_SCALE,
    html: Optional[Path] = typer.Option(None, "--html", help="write the plotly figure (accuracy against length) here"),
    as_json: bool = typer.Option(False, "--json", help='print {"results": [{"method", "length", "depth", "accuracy", ...}]}'),
    dtype: str = DTYPE,
    device: str = DEVICE,
) -> None:
    """Passkey retrieval (exact match, greedy) against prompt length and key depth, per extension method."""
    from residscope.analyses.extension import passkey_study
    from residscope.analyses.extension_plots import passkey_figure, passkey_table

    if keys < 1:
        raise InputError(f"--keys must be >= 1, got {keys}")
    dps = parse_fractions(depths, "--depths")
    m, model, w, html = _checked_model(model, device, dtype, factor, window, html)
    rows = passkey_study(m, _methods(m, method, methods, compare), _lengths(lengths, w), dps, n_keys=keys, seed=seed,
                         factor=factor, window=window, method_kw=_method_kw(window, ratio, alpha, layer, logit_scale),
                         progress=not as_json)
    if html is not None:
        write_figure(passkey_figure(rows, title=f"{model}: passkey retrieval"), html)
    if as_json:
        print(json_text({"model": model, "window": w, "results": [r.to_dict() for r in rows]}, indent=2))
    else:
        print(f"{model} (trained window {w}), passkey accuracy (mean over depths [per depth {dps}])")
        print(passkey_table(rows))


def register(app: typer.Typer) -> None:
    app.command("extend")(extend)
    app.command("passkey")(passkey)
