"""`residscope ruler`: RULER's synthetic long-context tasks (needle in a haystack, variable tracking, common and frequent
words) against length and needle depth, under any context-extension method of `residscope extend`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from residscope.model.errors import InputError

from .cli_common import (DEVICE, DTYPE, MODEL, NPROC, load, model_name, parse_fractions, parse_lengths, samples_option,
                         write_figure)
from .cli_output import json_text


def ruler(
    model: Optional[str] = MODEL,
    tasks: str = typer.Option("all", "--tasks", help="comma-separated RULER tasks (niah_single_1..3, niah_multikey_1..3, "
                                                     "niah_multivalue, niah_multiquery, vt, cwe, fwe) or all"),
    lengths: str = typer.Option("1024,2048,4096", "--lengths", help="comma-separated lengths in tokens (prompt + the "
                                                                     "task's generation budget)"),
    depths: str = typer.Option("0,0.5,1", "--depths", help="comma-separated needle depths in [0, 1] (cwe and fwe have none)"),
    samples: int = samples_option(3, "samples per task, length and depth"),
    seed: int = typer.Option(42, "--seed", help="seed of keys, values, words and distractor positions"),
    method: str = typer.Option("none", "--method", help="context-extension method, any of `residscope extend --method` "
                                                        "(none, pi, ntk, yarn, window, ...)"),
    factor: Optional[float] = typer.Option(None, "--factor", help="extension factor s (default: longest length / "
                                                                   "trained window, at least 1)"),
    window: Optional[int] = typer.Option(None, "--window", help="trained window (default: max_position_embeddings)"),
    logit_scale: Optional[float] = typer.Option(None, "--logit-scale", help="window: lambda (default ln(sW) / ln(W))"),
    text: Optional[Path] = typer.Option(None, "--text", help="essay haystack: a .txt or .jsonl file instead of the "
                                                             "built-in evaluation split"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the JSON here, and the heat map beside it (.html) "
                                                           "unless --html names another file"),
    html: Optional[Path] = typer.Option(None, "--html", help="write the heat-map figure (plotly HTML) here"),
    as_json: bool = typer.Option(False, "--json", help="print the JSON instead of a table"),
    dtype: str = DTYPE,
    device: str = DEVICE,
    nproc: int = NPROC,
) -> None:
    """RULER scores (string_match_all, percent) per task, length and depth; greedy decoding with the KV cache."""
    from residscope.analyses.extension import check_factor, check_window, method_options
    from residscope.analyses.ruler import check_request, ruler_grid, ruler_study
    from residscope.analyses.ruler_tasks import parse_tasks
    from residscope.common.atomic import atomic_write_text, check_output_file

    names = parse_tasks(tasks)
    lens = parse_lengths(lengths, "--lengths")
    dps = parse_fractions(depths, "--depths")
    check_request(names, lens, dps, samples)
    check_factor(factor)
    check_window(window)
    kw = method_options(method, window=window, logit_scale=logit_scale)  # refuses an unknown method
    out = check_output_file(out, "--out") if out is not None else None
    html = check_output_file(html, "--html") if html is not None else (out.with_suffix(".html") if out else None)
    haystack_text = haystack_source = None
    if text is not None:
        from residscope.analyses.corpus import corpus_text

        haystack_text, haystack_source = corpus_text(text)
    from residscope.apps import workers

    n_items = len(ruler_grid(names, lens, dps, samples))
    if workers.launched(ruler, locals(), nproc=nproc, n_batches=n_items):
        return
    device = workers.join(device, n_batches=n_items)
    m = load(model, device, dtype)
    result = ruler_study(m, names, lens, dps, samples=samples, seed=seed, method=method, factor=factor, window=window,
                         method_kw=kw, haystack_text=haystack_text,
                         haystack_source=haystack_source or "builtin:pydoc_data.topics/evaluation", progress=not as_json)
    if not workers.is_main():  # rank 0 alone reports
        return
    from residscope.analyses.ruler_plots import ruler_figure, ruler_table

    name = model_name(model)
    record = {"model": name, "tasks": names, "lengths": lens, "depths": dps, **result.to_dict()}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json_text(record, indent=2) + "\n")
    if html is not None:
        write_figure(ruler_figure(result, title=f"{name}: RULER"), html)
    if as_json:
        print(json_text(record, indent=2))
        return
    print(f"{name}, RULER synthetic tasks ({method}, factor {result.factor:g}; {samples} samples per task, length and "
          f"depth; string_match_all in percent)")
    print(ruler_table(result))
    for path in (out, html):
        if path is not None:
            print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("ruler")(ruler)
