"""`residscope bi`, `residscope prune`, `residscope ppl`: ShortGPT layer importance, layer pruning to a standard
checkpoint, and held-out perplexity. Heavy imports happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from residscope.model.errors import InputError

from .cli_common import (BATCH, DATASET, DEVICE, DTYPE, EVAL_SAMPLES, JSON, MODEL, NPROC, OFFLOAD, OUT_CHECKPOINT,
                         SAMPLES, SEED, SEQ_LEN, TEXT, samples_option, echo_err,
                         inputs_of, load, model_name, n_batches, parse_list, write_figure)
from .cli_output import json_text


def _influence(m, metric: str, shortgpt_compat: bool, seq_len: int, samples: int, batch_size: int, seed: int,
               text: Optional[Path], dataset: Optional[str]):
    from residscope.analyses.corpus import calibration_batches
    from residscope.surgery import block_influence_result

    batches, source = calibration_batches(m, seq_len=seq_len, samples=samples, batch_size=batch_size, seed=seed,
                                          text_file=text, dataset=dataset)
    return block_influence_result(m, batches, metric, shortgpt_compat=shortgpt_compat, source=source)


def _comparison_table(cmp, *, stability: bool) -> str:
    dense = cmp.dense
    lines = [f"held-out perplexity after removing {cmp.n_remove} of {cmp.n_layers} layers (dense {dense.ppl:.3f}; {dense.source})",
             f"{'method':<22} {'perplexity':>12} {'x dense':>8}" + (f" {'overlap':>8} {'rank corr':>9}" if stability else "")
             + "  removed layers" + ("  |  on the second slice" if stability else "")]
    for r in cmp.rows:
        spread = f" ± {r.ppl_std:.2f}" if r.ppl_std is not None else ""
        removed = _order_text(r.removed) if r.removed is not None else "(seeded)"
        line = f"{r.method:<22} {r.ppl:>12.3f} {r.ppl / dense.ppl:>8.2f}"
        if stability:
            over = f"{r.overlap:.2f}" if r.overlap is not None else "-"
            rho = f"{r.rank_correlation:.2f}" if r.rank_correlation is not None else "-"
            line += f" {over:>8} {rho:>9}"
        line += f"  {removed}{spread}"
        if stability and r.removed_b is not None:
            line += f"  |  {_order_text(r.removed_b)}"
        lines.append(line)
    return "\n".join(lines)


def _order_text(order) -> str:
    return ",".join(f"{x[0]}.{x[1]}" if isinstance(x, (list, tuple)) else str(x) for x in order)


def _parse_criteria(spec: Optional[str]) -> list[str]:
    from residscope.surgery.criteria import CRITERIA

    if spec is None:
        return list(CRITERIA)
    names = parse_list(spec, "--criteria", str, f"criteria like bi,sleb,reverse (from {', '.join(CRITERIA)})")
    unknown = [n for n in names if n not in CRITERIA]
    if unknown:
        raise InputError(f"--criteria: unknown {unknown[0]!r} (choose from {', '.join(CRITERIA)})")
    return names


def _check_prune_options(metric: str, remove: Optional[int], layers: Optional[str], compare: bool, out: Optional[Path],
                         force: bool, seeds: int, inputs: list) -> None:
    """Everything that can be refused before the model loads."""
    from residscope.common.atomic import check_output_dir
    from residscope.surgery.criteria import check_criterion

    check_criterion(metric, "--metric")
    if (remove is None) == (layers is None):
        raise InputError("give either --remove N or --layers 3,5,... (exactly one)")
    if layers is not None and not parse_list(layers, "--layers", int, "layer indices like 3,5,7"):
        raise InputError(f"--layers: no layer given ({layers!r}); name the layers to remove, e.g. 3,5,7")
    if compare and remove is None:
        raise InputError("--compare needs --remove N")
    if out is None and not compare:
        raise InputError("--out is required (the folder for the pruned checkpoint)")
    if out is not None:
        check_output_dir(out, "--out", force=force, inputs=inputs)  # fail before the slow part
    if seeds < 1:
        raise InputError(f"--seeds must be >= 1, got {seeds}")


def _influence_table(result) -> str:
    order = result.order()
    rank = {layer: r + 1 for r, layer in enumerate(order)}
    lines = [f"{result.metric} per layer ({result.n_tokens} tokens; {result.source}"
             + ("; ShortGPT-compatible" if result.shortgpt_compat else "") + ")",
             f"{'layer':>5}  {'score':>10}  {'mean cos':>9}  {'removal rank':>12}"]
    for i, s in enumerate(result.scores.tolist()):
        lines.append(f"{i:>5}  {s:>10.6f}  {float(result.mean_cos[i]):>9.6f}  {rank[i]:>12}")
    lines.append("remove first: " + ", ".join(map(str, order[: max(1, len(order) // 4)])))
    return "\n".join(lines)


def bi(
    model: Optional[str] = MODEL,
    metric: str = typer.Option("bi", "--metric", help="bi, angular, relative-magnitude, attn-bi or mlp-bi"),
    shortgpt_compat: bool = typer.Option(False, "--shortgpt-compat",
                                         help="reproduce the reference code: last layer vs final-norm output, NaN cos = 0.5"),
    seq_len: int = SEQ_LEN,
    samples: int = SAMPLES,
    batch_size: int = BATCH,
    seed: int = SEED,
    text: Optional[Path] = TEXT,
    dataset: Optional[str] = DATASET,
    as_json: bool = JSON,
    html: Optional[Path] = typer.Option(None, "--html", help="write a plotly chart of the scores to this HTML file"),
    dtype: str = DTYPE,
    device: str = DEVICE,
    nproc: int = NPROC,
    offload: bool = OFFLOAD,
) -> None:
    """Per-layer importance (ShortGPT Block Influence or another metric) on calibration text."""
    from residscope.apps import workers
    from residscope.common.atomic import check_output_file
    from residscope.surgery.influence import check_metric

    check_metric(metric)
    if html is not None:
        html = check_output_file(html, "--html", inputs=inputs_of(model, text))  # before the slow part
    if workers.launched(bi, locals(), nproc=nproc, n_batches=n_batches(samples, batch_size)):
        return
    device = workers.join(device, n_batches=n_batches(samples, batch_size))
    m = load(model, device, dtype, offload)
    result = _influence(m, metric, shortgpt_compat, seq_len, samples, batch_size, seed, text, dataset)
    if not workers.is_main():  # rank 0 alone reports
        return
    if html is not None:
        from residscope.surgery.plots import influence_figure

        write_figure(influence_figure(result, highlight=max(1, len(result.scores) // 4)), html, inline_js=True)
        echo_err(f"wrote {html}")
    if as_json:
        typer.echo(json_text({**result.to_dict(), "order": result.order(), "model": model_name(model)}, indent=2))
    else:
        typer.echo(_influence_table(result))


def ppl(
    model: Optional[str] = MODEL,
    text: Optional[Path] = typer.Option(None, "--text", help="text file (default: the built-in evaluation split)"),
    dataset: Optional[str] = DATASET,
    seq_len: int = SEQ_LEN,
    samples: int = samples_option(32, "evaluation sequences"),
    batch_size: int = BATCH,
    seed: int = SEED,
    as_json: bool = JSON,
    dtype: str = DTYPE,
    device: str = DEVICE,
    nproc: int = NPROC,
    offload: bool = OFFLOAD,
) -> None:
    """Held-out perplexity of a model."""
    from residscope.analyses.perplexity import heldout_perplexity
    from residscope.apps import workers

    if workers.launched(ppl, locals(), nproc=nproc, n_batches=n_batches(samples, batch_size)):
        return
    device = workers.join(device, n_batches=n_batches(samples, batch_size))
    m = load(model, device, dtype, offload)
    r = heldout_perplexity(m, seq_len=seq_len, samples=samples, batch_size=batch_size, seed=seed, text_file=text, dataset=dataset)
    if not workers.is_main():  # rank 0 alone reports
        return
    if as_json:
        typer.echo(json_text({**r.to_dict(), "model": model_name(model)}, indent=2))
    else:
        typer.echo(f"perplexity {r.ppl:.4f}  (nll {r.nll:.4f} nats/token, {r.n_tokens} predicted tokens; {r.source})")


def prune(
    model: Optional[str] = MODEL,
    remove: Optional[int] = typer.Option(None, "--remove", help="number of layers to remove, chosen by --metric"),
    layers: Optional[str] = typer.Option(None, "--layers", help="explicit layers to remove, e.g. 3,5,7"),
    metric: str = typer.Option("bi", "--metric", help="bi, angular, relative-magnitude, attn-bi, mlp-bi, angular-block, "
                               "ppl, taylor, sleb, blockprune, or a baseline: sequential, reverse, random"),
    shortgpt_compat: bool = typer.Option(False, "--shortgpt-compat"),
    out: Optional[Path] = OUT_CHECKPOINT,
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out folder (and an existing --gguf file)"),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="also write the pruned model as a GGUF file for llama.cpp"),
    quant: str = typer.Option("f32", "--quant", help="with --gguf: f32, f16, q8_0 or q4_0"),
    compare: bool = typer.Option(False, "--compare", help="table of held-out perplexity after removing --remove layers "
                                 "by every criterion (--criteria), and how each choice moves on a second, disjoint "
                                 "calibration slice of the same size"),
    criteria: Optional[str] = typer.Option(None, "--criteria", help="criteria --compare runs, e.g. bi,angular-block,"
                                           "reverse (default: all)"),
    seeds: int = typer.Option(5, "--seeds", help="random-baseline seeds averaged by --compare"),
    seq_len: int = SEQ_LEN,
    samples: int = SAMPLES,
    eval_samples: int = EVAL_SAMPLES,
    batch_size: int = BATCH,
    seed: int = SEED,
    text: Optional[Path] = TEXT,
    dataset: Optional[str] = DATASET,
    as_json: bool = JSON,
    dtype: str = DTYPE,
    device: str = DEVICE,
    nproc: int = NPROC,
    offload: bool = OFFLOAD,
) -> None:
    """Remove layers (chosen by a criterion, or explicit ones), report held-out perplexity before and after, and save a
    standard transformers checkpoint."""
    import torch

    from residscope.analyses.corpus import calibration_batches
    from residscope.apps import workers
    from residscope.surgery import pruning_record, save_pretrained
    from residscope.surgery.compare import apply_removal, compare_removals, heldout_scorer
    from residscope.surgery.criteria import BASELINES, check_count, selection
    from residscope.surgery.removal import check_layers

    _check_prune_options(metric, remove, layers, compare, out, force, seeds, inputs_of(model, text))
    chosen_criteria = _parse_criteria(criteria) if compare else []
    if offload and ((metric == "taylor" and layers is None) or "taylor" in chosen_criteria):
        raise InputError("criterion taylor needs every block's weights and gradients in memory at once; it cannot "
                         "stream (--offload): leave out --offload (or taylor from --criteria)")
    work = n_batches(min(samples, eval_samples), batch_size)
    if workers.launched(prune, locals(), nproc=nproc, n_batches=work):
        return
    device = workers.join(device, n_batches=work)
    if gguf is not None:
        from residscope.model.gguf_export import check_gguf_target, check_quant

        check_quant(quant)
        check_gguf_target(gguf, force=force)  # before the slow part
        if out is None:
            raise InputError("--gguf needs --out (the pruned checkpoint is written as a folder too)")
    m = load(model, device, dtype, offload)
    n_layers = m.cfg.n_layers
    explicit = check_layers(parse_list(layers, "--layers", int, "layer indices like 3,5,7"), n_layers, arg="--layers") \
        if layers is not None else None
    if explicit is None:
        check_count(m, remove, metric, "--remove")
    # token batches are built once: every candidate model is scored on the same held-out and calibration tokens
    eval_batches, eval_source = calibration_batches(m, seq_len=seq_len, samples=eval_samples, batch_size=batch_size,
                                                    seed=seed, split="evaluation")
    evaluate = heldout_scorer(eval_batches, eval_source, progress=workers.is_main())
    dense = evaluate(m)
    report: dict = {"model": model_name(model), "n_layers": n_layers, "dense": dense.to_dict()}
    calib = calib_source = None
    if explicit is None and (compare or metric not in BASELINES):
        # --compare draws twice the samples: the first half is what a plain run calibrates on (the same seeded
        # chunks), the second half a disjoint slice for the stability columns
        total = samples * (2 if compare else 1)
        both, calib_source = calibration_batches(m, seq_len=seq_len, samples=total, batch_size=batch_size, seed=seed,
                                                 text_file=text, dataset=dataset)
        chunks = torch.cat(both)  # [total, seq_len]
        calib = list(chunks[:samples].split(batch_size))
        calib_b = list(chunks[samples:].split(batch_size)) if compare else None
    if compare:
        source_a = f"{calib_source}, chunks 1-{samples}"
        source_b = f"{calib_source}, chunks {samples + 1}-{2 * samples}"
        cmp = compare_removals(m, remove, eval_batches, calibration_batches=calib, stability_batches=calib_b,
                               methods=chosen_criteria, seeds=seeds, dense=dense, eval_source=eval_source,
                               calibration_source=source_a, stability_source=source_b, shortgpt_compat=shortgpt_compat,
                               progress=workers.is_main())
        report["compare"] = {"removed": remove, "calibration": source_a, "second_slice": source_b,
                             "rows": cmp.to_dict()["rows"]}
        if workers.is_main() and not as_json:
            typer.echo(_comparison_table(cmp, stability=True))
        if out is None:
            if workers.is_main() and as_json:
                typer.echo(json_text(report, indent=2))
            return

    if explicit is not None:
        order, chosen, used_metric = explicit, None, "explicit"
    else:
        chosen = selection(m, calib, remove, metric, seed=seed, shortgpt_compat=shortgpt_compat, source=calib_source,
                           progress=workers.is_main())
        order, used_metric = chosen.order, metric
    pruned = apply_removal(m, order)
    after = evaluate(pruned)
    if not workers.is_main():  # rank 0 alone writes and reports
        return
    extra = {}
    if chosen is not None and chosen.criterion not in BASELINES:
        extra = {"calibration": calib_source, "n_tokens": chosen.n_tokens}
    order_json = [list(x) if isinstance(x, tuple) else x for x in order]
    record = pruning_record(removed_layers=[x for x in order if not isinstance(x, tuple)], n_layers_before=n_layers,
                            metric=used_metric, scores=chosen.scores if chosen is not None and chosen.scores else None,
                            perplexity={"before": dense.to_dict(), "after": after.to_dict()}, **extra)
    if chosen is not None and chosen.steps:
        record["steps"] = chosen.steps  # the greedy searches' per-step perplexities
    if chosen is not None and chosen.criterion == "blockprune":
        record["removed_halves"] = order_json
    folder = save_pretrained(pruned, out, pruning_info=record, force=force)
    report.update(removed_layers=order_json, metric=used_metric, after=after.to_dict(), out=str(folder))
    if gguf is not None:
        from residscope.model.gguf_export import write_gguf

        report["gguf"] = write_gguf(pruned, gguf, quant=quant, force=force).to_dict()
    if as_json:
        typer.echo(json_text(report, indent=2))
    else:
        what = "attention/MLP halves" if chosen is not None and chosen.criterion == "blockprune" else "layers"
        typer.echo(f"removed {len(order)} {what} of {n_layers} layers by {used_metric}: {_order_text(order)}")
        typer.echo(f"held-out perplexity: {dense.ppl:.4f} -> {after.ppl:.4f} (x{after.ppl / dense.ppl:.2f}; {after.source})")
        typer.echo(f"saved {folder} (loads with transformers.AutoModelForCausalLM.from_pretrained)")
        if gguf is not None:
            typer.echo(f"wrote {gguf} ({quant}, {report['gguf']['n_bytes'] / 2**20:.1f} MiB; runs in llama.cpp)")


def register(app: typer.Typer) -> None:
    app.command("bi")(bi)
    app.command("prune")(prune)
    app.command("ppl")(ppl)
