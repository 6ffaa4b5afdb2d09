"""`residscope extend` (sliding-window perplexity against length per extension method) and `residscope passkey`
(passkey retrieval against length and depth). Methods: none, pi, ntk, dynamic-ntk, yarn, dca, pv-replace, window."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from residscope.model.errors import InputError

from .cli_common import (DEVICE, DTYPE, MODEL, NPROC, inputs_of, load, model_name, parse_fractions, parse_lengths,
                         write_figure)
from .cli_output import json_text


# options both commands take, with the same meaning
METHOD = typer.Option(None, "--method", help="none, pi, ntk, dynamic-ntk, yarn, dca, pv-replace or window")
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


def _checked_options(factor: Optional[float], window: Optional[int], html: Optional[Path],
                     model: Optional[str]) -> Optional[Path]:
    """The options both commands check before any work (and before workers start); returns the checked --html path."""
    from residscope.analyses.extension import check_factor, check_window
    from residscope.common.atomic import check_output_file

    check_factor(factor)
    check_window(window)
    return check_output_file(html, "--html", inputs=inputs_of(model)) if html is not None else None


def _loaded(model: Optional[str], device: str, dtype: str, window: Optional[int]):
    """(model, its name, trained window)."""
    from residscope.analyses.extension import trained_window

    m = load(model, device, dtype)
    return m, model_name(model), trained_window(m, window)


def _lengths(lengths: Optional[str], window: int) -> list[int]:
    return parse_lengths(lengths, "--lengths") if lengths else [window, 2 * window, 4 * window, 8 * window]


def _window_batches(model: Optional[str], lengths: Optional[str], window: Optional[int], max_tokens: int,
                    stride: Optional[int], batch_size: int) -> int:
    """Window batches of the longest length (the fewest), from the config alone, for checking --nproc before loading;
    with --max-tokens 0 (the whole split) the count is unknown until the text is read, so nothing is refused."""
    if max_tokens <= 0:
        return 2**31
    from residscope.model import load_config

    longest = max(parse_lengths(lengths, "--lengths")) if lengths else 8 * (
        window or load_config(model_name(model)).max_position_embeddings or 1)
    n_windows = max(1, (max_tokens - longest) // (stride or max(1, longest // 2)) + 1)
    return -(-n_windows // batch_size)


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
    text: Optional[str] = typer.Option(None, "--text", help="evaluation text: a .txt/.jsonl file or a built-in corpus "
                                       "(builtin:plays/evaluation: Shakespeare's plays, long documents for 16k-32k)"),
    stride: Optional[int] = typer.Option(None, "--stride", help="window stride (default: half the length)"),
    batch_size: int = typer.Option(4, "--batch-size"),
    html: Optional[Path] = typer.Option(None, "--html", help="write the plotly figure (perplexity against length) here"),
    as_json: bool = typer.Option(False, "--json", help='print {"results": [{"method", "length", "ppl", ...}]}'),
    dtype: str = DTYPE,
    device: str = DEVICE,
    nproc: int = NPROC,
) -> None:
    """Sliding-window perplexity of the held-out split against length, for one extension method or a comparison."""
    from residscope.analyses.extension import extension_perplexity
    from residscope.analyses.extension_plots import perplexity_figure, perplexity_table

    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    html = _checked_options(factor, window, html, model)
    from residscope.apps import workers

    n_batches = _window_batches(model, lengths, window, max_tokens, stride, batch_size)
    if workers.launched(extend, locals(), nproc=nproc, n_batches=n_batches):
        return
    device = workers.join(device, n_batches=n_batches)
    m, model, w = _loaded(model, device, dtype, window)
    rows = extension_perplexity(m, _methods(m, method, methods, compare), _lengths(lengths, w), factor=factor, window=window,
                                max_tokens=max_tokens or None, stride=stride, batch_size=batch_size, progress=not as_json,
                                method_kw=_method_kw(window, ratio, alpha, layer, logit_scale), text=text)
    if not workers.is_main():  # rank 0 alone reports
        return
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
    nproc: int = NPROC,
) -> None:
    """Passkey retrieval (exact match, greedy) against prompt length and key depth, per extension method."""
    from residscope.analyses.extension import passkey_study
    from residscope.analyses.extension_plots import passkey_figure, passkey_table

    if keys < 1:
        raise InputError(f"--keys must be >= 1, got {keys}")
    dps = parse_fractions(depths, "--depths")
    html = _checked_options(factor, window, html, model)
    from residscope.apps import workers

    n_prompts = keys * len(dps) * (len(parse_lengths(lengths, "--lengths")) if lengths else 4)  # 4 default lengths
    if workers.launched(passkey, locals(), nproc=nproc, n_batches=n_prompts):
        return
    device = workers.join(device, n_batches=n_prompts)
    m, model, w = _loaded(model, device, dtype, window)
    rows = passkey_study(m, _methods(m, method, methods, compare), _lengths(lengths, w), dps, n_keys=keys, seed=seed,
                         factor=factor, window=window, method_kw=_method_kw(window, ratio, alpha, layer, logit_scale),
                         progress=not as_json)
    if not workers.is_main():  # rank 0 alone reports
        return
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
