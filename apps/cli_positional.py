"""`residscope positional`: positional vectors, attention sinks, removal of positional vectors and linear probes
(Dong et al., NeurIPS 2024). Writes a JSON summary, the positional vectors (safetensors) and plotly HTML figures to --out;
every file is written to a temporary name, then renamed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from residscope.model.errors import InputError

from .cli_common import (DEVICE, DTYPE, FORCE, MODEL, NPROC, OFFLOAD, eval_samples_option, inputs_of, samples_option,
                         load, model_name, n_batches, parse_indices)
from .cli_output import json_text


def _table(summary: dict, n_resid_layers: int, out: Path) -> str:
    pos, sink = summary["positional"], summary["attention"]["sink_mass_by_block"]
    lines = [f"positional vectors of {summary['model']}: {summary['n_samples']} x {summary['seq_len']} tokens ({summary['source']})",
             f"{'layer':>5}  {'share':>7}  {'R2':>6}  {'R2 t>=k':>7}  {'distinct':>8}  {'tok0/median':>11}  {'sink (block l)':>14}"]
    for layer in range(n_resid_layers):
        s = f"{sink[layer]:>14.3f}" if layer < len(sink) else f"{'':>14}"
        lines.append(f"{layer:>5}  {pos['positional_share'][layer]:>7.3f}  {pos['positional_r2'][layer]:>6.3f}  "
                     f"{pos['positional_r2_after_first_k'][layer]:>7.3f}  "
                     f"{pos['n_distinct'][layer]:>8}  {pos['first_token_ratio'][layer]:>11.1f}  {s}")
    for r in summary["removal"]:
        lines.append(f"{r['label']:<40} ppl {r['ppl']:>10.3f}  sink {r['sink_mass']:.3f}  decay {r['decay_ratio']:.2f}")
    for p in summary["probes"]:
        lines.append(f"probe {p['target']} ({p['metric']}): " + " ".join(f"{s:.2f}" for s in p["score"])
                     + f"  | control max {max(p['control']):.2f}")
    lines.append(f"wrote {len(summary['files'])} files to {out}")
    return "\n".join(lines)


def positional(
    model: Optional[str] = MODEL,
    samples: int = samples_option(64, "calibration sequences for the decomposition"),
    seq_len: int = typer.Option(128, "--seq-len", help="tokens per sequence"),
    out: Path = typer.Option(..., "--out", help="output folder (created if missing; must be empty unless --force)"),
    force: bool = FORCE,
    batch_size: int = typer.Option(8, "--batch-size"),
    seed: int = typer.Option(0, "--seed", help="seed of the chunk order"),
    text: Optional[Path] = typer.Option(None, "--text", help=".txt or .jsonl text file instead of the built-in corpus"),
    first_k: int = typer.Option(4, "--first-k", help="initial tokens counted as sinks / positional basis"),
    cos_threshold: float = typer.Option(0.95, "--cos-threshold", help="cosine at which positional vectors count as one"),
    remove_layers: str = typer.Option("1,4", "--remove-layers",
                                      help="residual layers (0 = embeddings) at which to remove positional vectors, one "
                                           "experiment per layer; empty to skip"),
    eval_samples: int = eval_samples_option(16, "held-out sequences for perplexity with/without removal"),
    probe_tokens: int = typer.Option(4096, "--probe-tokens", help="token cap for probe activations (0 = no probes)"),
    as_json: bool = typer.Option(False, "--json", help="print the JSON summary instead of a table"),
    dtype: str = DTYPE,
    device: str = DEVICE,
    nproc: int = NPROC,
    offload: bool = OFFLOAD,
) -> None:
    """Decompose the residual stream into positional vectors, measure sinks and decay, remove positional vectors, probe."""
    from residscope.analyses.corpus import calibration_batches
    from residscope.analyses.positional_plots import study_figures
    from residscope.analyses.positional_study import positional_study
    from residscope.apps import workers
    from residscope.common.atomic import atomic_dir, check_output_dir
    from residscope.probes.linear import collect_activations, first_tokens_probe, position_probe

    if first_k < 1 or first_k > seq_len:
        raise InputError(f"--first-k must be in 1..--seq-len ({seq_len}), got {first_k}")
    if not 0 < cos_threshold <= 1:
        raise InputError(f"--cos-threshold must be in (0, 1], got {cos_threshold}")
    out = check_output_dir(out, "--out", force=force, inputs=inputs_of(model, text))  # before the slow part
    if workers.launched(positional, locals(), nproc=nproc, n_batches=n_batches(samples, batch_size)):
        return
    device = workers.join(device, n_batches=n_batches(samples, batch_size))
    m, progress = load(model, device, dtype, offload), not as_json
    layers = parse_indices(remove_layers, "--remove-layers", m.cfg.n_layers + 1, note=" (0 = embeddings)")
    batches, source = calibration_batches(m, seq_len=seq_len, samples=samples, batch_size=batch_size, seed=seed,
                                          text_file=text)
    # held-out text: the evaluation split of the built-in corpus, or the same user file with another chunk order
    held_out = calibration_batches(m, seq_len=seq_len, samples=eval_samples, batch_size=batch_size, seed=seed + 1,
                                   split="evaluation", text_file=text)[0] if layers else None
    study = positional_study(m, batches, first_k=first_k, cos_threshold=cos_threshold, remove_layers=layers,
                             eval_batches=held_out, source=source, progress=progress)
    if not workers.is_main():  # rank 0 alone collects the probes' activations (they need all of them) and writes
        return
    probes = []
    if probe_tokens > 0:
        acts = collect_activations(m, batches, max_tokens=probe_tokens, progress=progress)
        probes = [position_probe(acts, progress=progress), first_tokens_probe(acts, first_k, progress=progress)]

    figures = study_figures(study, probes)
    summary = dict(model=model_name(model), **study.summary(), probes=[p.to_dict() for p in probes],
                   files=sorted([*figures, "positional_vectors.safetensors", "summary.json"]))
    summary_json = json_text(summary, indent=1)
    with atomic_dir(out) as tmp:  # the whole folder appears at once (with --force, it replaces the old one)
        for name, fig in figures.items():
            fig.write_html(str(tmp / name), include_plotlyjs="cdn")
        study.decomposition.save(tmp / "positional_vectors.safetensors")
        (tmp / "summary.json").write_text(summary_json)
    typer.echo(summary_json if as_json else _table(summary, study.decomposition.n_resid_layers, out))




def long_context(
    model: Optional[str] = MODEL,
    seq_len: int = typer.Option(16384, "--seq-len", help="tokens per sequence (16k-32k is what this command is for)"),
    samples: int = samples_option(1, "sequences (one forward each)"),
    text: str = typer.Option("builtin:plays/evaluation", "--text",
                             help="long-document text: builtin:plays/<split>, builtin:pydoc/<split> or a .txt/.jsonl file"),
    first_k: int = typer.Option(4, "--first-k", help="initial tokens counted as sinks"),
    rows: int = typer.Option(256, "--rows", help="query rows per attention block (memory: batch x heads x rows x seq-len)"),
    statistics: str = typer.Option("sinks,distance,entropy", "--statistics",
                                   help="sinks (always) plus distance and/or entropy; each adds value columns to the "
                                        "fused attention kernel (sinks alone cost what SDPA costs)"),
    positional_layers: str = typer.Option("", "--positional-layers",
                                          help="residual layers (0 = embeddings) whose positional vectors to accumulate "
                                               "(float64 [layers, seq-len, d_model]); empty for none"),
    method: Optional[str] = typer.Option(None, "--method", help="context-extension method applied during the run "
                                         "(none, pi, ntk, dynamic-ntk, yarn, dca, window; factor = seq-len / window)"),
    seed: int = typer.Option(0, "--seed", help="seed of the chunk order"),
    html: Optional[Path] = typer.Option(None, "--html", help="write the plotly figure here"),
    as_json: bool = typer.Option(False, "--json", help="print the full statistics as JSON"),
    dtype: str = DTYPE,
    device: str = DEVICE,
) -> None:
    """Attention statistics (sink mass, first-k attention, entropy, attended distance) of every layer and head and the
    per-position loss at long lengths, by query chunks: no attention pattern or logits tensor is ever held whole."""
    from residscope.analyses.extension import apply_method, extension_settings
    from residscope.analyses.long_context import long_context_batches, long_context_statistics
    from residscope.analyses.long_context_plots import statistics_figure
    from residscope.common.atomic import check_output_file

    from .cli_common import write_figure

    if seq_len < 2 or samples < 1:
        raise InputError(f"--seq-len must be >= 2 and --samples >= 1, got {seq_len} and {samples}")
    if not 1 <= first_k < seq_len:
        raise InputError(f"--first-k must be in 1..--seq-len - 1 ({seq_len - 1}), got {first_k}")
    need = tuple(x.strip() for x in statistics.split(",") if x.strip())
    unknown = [x for x in need if x not in ("sinks", "distance", "entropy")]
    if unknown:
        raise InputError(f"--statistics: unknown {unknown[0]!r} (choose from sinks, distance, entropy)")
    html = check_output_file(html, "--html") if html is not None else None
    m = load(model, device, dtype)
    pv_layers = parse_indices(positional_layers, "--positional-layers", m.cfg.n_layers + 1,
                              note=" (0 = embeddings)") if positional_layers.strip() else []
    batches, source = long_context_batches(m, seq_len, samples, text=text, seed=seed)
    name = method or "none"
    f, kw = extension_settings(m, name, [seq_len]) if method else (1.0, {})
    with apply_method(m, name, f, **kw):
        stats = long_context_statistics(m, batches, first_k=first_k, rows=rows, statistics=need, positional_layers=pv_layers,
                                        source=source, progress=not as_json)
    if html is not None:
        write_figure(statistics_figure(stats, title=f"{model_name(model)}: attention and loss at {seq_len:,} tokens "
                                                    f"({name})"), html)
    if as_json:
        print(json_text({"model": model_name(model), "method": name, **stats.to_dict()}, indent=1))
        return
    print(f"{model_name(model)} at {seq_len:,} tokens ({source}, method {name}): loss {stats.loss:.4f}")
    print(f"{'block':>5}  {'sink':>6}  {'entropy':>7}  {'distance':>9}")
    for i, layer in enumerate(stats.layers):
        entropy = "-" if stats.entropy is None else f"{stats.entropy[i].mean():.3f}"
        distance = "-" if stats.mean_distance is None else f"{stats.mean_distance[i].mean():.1f}"
        print(f"{layer:>5}  {stats.sink_mass[i].mean():>6.3f}  {entropy:>7}  {distance:>9}")
    if html is not None:
        print(f"figure: {html}")


def register(app: typer.Typer) -> None:
    app.command("positional")(positional)
    app.command("long-context")(long_context)
