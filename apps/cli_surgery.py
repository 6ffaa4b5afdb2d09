"""`residscope bi`, `residscope prune`, `residscope ppl`: ShortGPT layer importance, layer pruning to a standard
checkpoint, and held-out perplexity. Heavy imports happen inside the commands."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

import typer

DEFAULT_MODEL = "smollm2-135m"

_MODEL = typer.Option(DEFAULT_MODEL, "--model", help="checkpoint folder, GGUF file or alias")
_DTYPE = typer.Option("float32", "--dtype", help="float32, bfloat16, float16 or float64")
_DEVICE = typer.Option("cpu", "--device")
_SEQ_LEN = typer.Option(256, "--seq-len", help="tokens per sequence")
_BATCH = typer.Option(4, "--batch-size")
_SEED = typer.Option(0, "--seed", help="seed of the chunk order")
_TEXT = typer.Option(None, "--text", help=".txt or .jsonl text file instead of the built-in corpus")
_DATASET = typer.Option(None, "--dataset", help="a `datasets` dataset name (needs the network and residscope[online])")
_JSON = typer.Option(False, "--json", help="print JSON instead of a table")
_NPROC = typer.Option(1, "--nproc", help="local data-parallel workers (torch.distributed); or start under torchrun")
_OFFLOAD = typer.Option(False, "--offload", help="keep the blocks on disk and stream them one at a time (models larger "
                        "than memory; safetensors only)")


def _load(model: str, device: str, dtype: str, offload: bool = False):
    from residscope.model import load_model

    return load_model(model, device=device, dtype=dtype, offload=offload)


def _echo_err(msg: str) -> None:
    typer.echo(msg, err=True)


def _parse_layers(spec: str) -> list[int]:
    try:
        return [int(x) for x in spec.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ValueError(f"--layers: expected comma-separated layer indices like 3,5,7; got {spec!r}") from None


def _influence(m, metric: str, shortgpt_compat: bool, seq_len: int, samples: int, batch_size: int, seed: int,
               text: Optional[Path], dataset: Optional[str]):
    from residscope.analyses.corpus import calibration_batches
    from residscope.surgery import block_influence_result

    batches, source = calibration_batches(m, seq_len=seq_len, samples=samples, batch_size=batch_size, seed=seed,
                                          text_file=text, dataset=dataset)
    return block_influence_result(m, batches, metric, shortgpt_compat=shortgpt_compat, source=source)


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
    model: str = _MODEL,
    metric: str = typer.Option("bi", "--metric", help="bi, angular, relative-magnitude, attn-bi or mlp-bi"),
    shortgpt_compat: bool = typer.Option(False, "--shortgpt-compat",
                                         help="reproduce the reference code: last layer vs final-norm output, NaN cos = 0.5"),
    seq_len: int = _SEQ_LEN,
    samples: int = typer.Option(32, "--samples", help="calibration sequences"),
    batch_size: int = _BATCH,
    seed: int = _SEED,
    text: Optional[Path] = _TEXT,
    dataset: Optional[str] = _DATASET,
    as_json: bool = _JSON,
    html: Optional[Path] = typer.Option(None, "--html", help="write a plotly chart of the scores to this HTML file"),
    dtype: str = _DTYPE,
    device: str = _DEVICE,
    nproc: int = _NPROC,
    offload: bool = _OFFLOAD,
) -> None:
    """Per-layer importance (ShortGPT Block Influence or another metric) on calibration text."""
    from residscope.apps import workers
    from residscope.surgery.influence import check_metric

    check_metric(metric)
    n_batches = -(-samples // batch_size) if samples > 0 and batch_size > 0 else 1
    if workers.launched(bi, locals(), nproc=nproc, n_batches=n_batches):
        return
    device = workers.join(device, n_batches=n_batches)
    m = _load(model, device, dtype, offload)
    result = _influence(m, metric, shortgpt_compat, seq_len, samples, batch_size, seed, text, dataset)
    if not workers.is_main():
        return
    if html is not None:
        from residscope.surgery.plots import influence_figure

        influence_figure(result, highlight=max(1, len(result.scores) // 4)).write_html(str(html))
        _echo_err(f"wrote {html}")
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "order": result.order(), "model": model}, indent=2))
    else:
        typer.echo(_influence_table(result))


def ppl(
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="checkpoint folder (e.g. a pruned one), GGUF file or alias"),
    text: Optional[Path] = typer.Option(None, "--text", help="text file (default: the built-in evaluation split)"),
    dataset: Optional[str] = _DATASET,
    seq_len: int = _SEQ_LEN,
    samples: int = typer.Option(32, "--samples", help="evaluation sequences"),
    batch_size: int = _BATCH,
    seed: int = _SEED,
    as_json: bool = _JSON,
    dtype: str = _DTYPE,
    device: str = _DEVICE,
    nproc: int = _NPROC,
    offload: bool = _OFFLOAD,
) -> None:
    """Held-out perplexity of a model."""
    from residscope.analyses.perplexity import heldout_perplexity
    from residscope.apps import workers

    n_batches = -(-samples // batch_size) if samples > 0 and batch_size > 0 else 1
    if workers.launched(ppl, locals(), nproc=nproc, n_batches=n_batches):
        return
    device = workers.join(device, n_batches=n_batches)
    m = _load(model, device, dtype, offload)
    r = heldout_perplexity(m, seq_len=seq_len, samples=samples, batch_size=batch_size, seed=seed, text_file=text, dataset=dataset)
    if not workers.is_main():
        return
    if as_json:
        typer.echo(json.dumps({**r.to_dict(), "model": model}, indent=2))
    else:
        typer.echo(f"perplexity {r.ppl:.4f}  (nll {r.nll:.4f} nats/token, {r.n_tokens} predicted tokens; {r.source})")


def prune(
    model: str = _MODEL,
    remove: Optional[int] = typer.Option(None, "--remove", help="number of layers to remove, chosen by --metric"),
    layers: Optional[str] = typer.Option(None, "--layers", help="explicit layers to remove, e.g. 3,5,7"),
    metric: str = typer.Option("bi", "--metric", help="bi, angular, relative-magnitude, attn-bi, mlp-bi, or a baseline: "
                               "sequential, reverse, random"),
    shortgpt_compat: bool = typer.Option(False, "--shortgpt-compat"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for the pruned checkpoint"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out folder"),
    compare: bool = typer.Option(False, "--compare", help="table of held-out perplexity after removing --remove layers "
                                 "by every metric and baseline"),
    seeds: int = typer.Option(5, "--seeds", help="random-baseline seeds averaged by --compare"),
    seq_len: int = _SEQ_LEN,
    samples: int = typer.Option(32, "--samples", help="calibration sequences"),
    eval_samples: int = typer.Option(32, "--eval-samples", help="held-out evaluation sequences"),
    batch_size: int = _BATCH,
    seed: int = _SEED,
    text: Optional[Path] = _TEXT,
    dataset: Optional[str] = _DATASET,
    as_json: bool = _JSON,
    dtype: str = _DTYPE,
    device: str = _DEVICE,
    offload: bool = _OFFLOAD,
) -> None:
    """Remove layers (lowest score first, or explicit ones), report held-out perplexity before and after, and save a
    standard transformers checkpoint."""
    from residscope.analyses.corpus import calibration_batches
    from residscope.analyses.perplexity import perplexity
    from residscope.surgery import (BASELINES, METRICS, block_influence_result, pruning_record, remove_layers,
                                    removal_order, save_pretrained)
    from residscope.model.export import check_target
    from residscope.surgery.removal import check_layers

    if metric not in METRICS + BASELINES:
        raise ValueError(f"--metric must be one of {', '.join(METRICS + BASELINES)}; got {metric!r}")
    if (remove is None) == (layers is None):
        raise ValueError("give either --remove N or --layers 3,5,... (exactly one)")
    if compare and remove is None:
        raise ValueError("--compare needs --remove N")
    if out is None and not compare:
        raise ValueError("--out is required (the folder for the pruned checkpoint)")
    if out is not None:
        check_target(Path(out).expanduser(), force)  # fail before the slow part
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    explicit = _parse_layers(layers) if layers is not None else None

    m = _load(model, device, dtype, offload)
    n_layers = m.cfg.n_layers
    if explicit is not None:
        check_layers(explicit, n_layers, arg="--layers")
    elif not 0 < remove < n_layers:
        raise ValueError(f"--remove must be between 1 and {n_layers - 1} for this {n_layers}-layer model; got {remove}")

    # token batches are built once: every candidate model is scored on the same held-out and calibration tokens
    eval_batches, eval_source = calibration_batches(m, seq_len=seq_len, samples=eval_samples, batch_size=batch_size,
                                                    seed=seed, split="evaluation")

    def evaluate(mm):
        r = perplexity(mm, eval_batches, desc="held-out perplexity")
        r.source = eval_source
        return r

    dense = evaluate(m)
    report: dict = {"model": model, "n_layers": n_layers, "dense": dense.to_dict()}

    influences: dict[str, object] = {}
    calib: list = []

    def scores_for(name: str):
        """Influence result for a metric; bi, angular and relative-magnitude come from one pass."""
        key = name if name in ("attn-bi", "mlp-bi") else "block"
        if not calib:
            calib.extend(calibration_batches(m, seq_len=seq_len, samples=samples, batch_size=batch_size, seed=seed,
                                             text_file=text, dataset=dataset))
        if key not in influences:
            influences[key] = block_influence_result(m, calib[0], "bi" if key == "block" else name,
                                                     shortgpt_compat=shortgpt_compat, source=calib[1])
        res = influences[key]
        return {"angular": res.angular, "relative-magnitude": res.relative_magnitude}.get(name, res.scores), res

    if compare:
        rows = []
        for name in METRICS + BASELINES:
            if name in METRICS:
                scores, _ = scores_for(name)
                runs = [removal_order(scores, remove)]
            elif name == "random":
                runs = [removal_order("random", remove, n_layers=n_layers, seed=s) for s in range(seeds)]
            else:
                runs = [removal_order(name, remove, n_layers=n_layers)]
            ppls = [evaluate(remove_layers(m, order)).ppl for order in runs]
            rows.append(dict(method=name if name != "random" else f"random (mean of {seeds})", removed=runs[0] if len(runs) == 1 else None,
                             ppl=statistics.fmean(ppls), ppl_std=statistics.stdev(ppls) if len(ppls) > 1 else None,
                             ppls=ppls))
        report["compare"] = {"removed": remove, "rows": rows}
        if not as_json:
            typer.echo(f"held-out perplexity after removing {remove} of {n_layers} layers (dense {dense.ppl:.3f}; {dense.source})")
            typer.echo(f"{'method':<22} {'perplexity':>12} {'x dense':>8}  removed layers")
            for r in rows:
                spread = f" ± {r['ppl_std']:.2f}" if r["ppl_std"] is not None else ""
                removed = ",".join(map(str, r["removed"])) if r["removed"] is not None else "(seeded)"
                typer.echo(f"{r['method']:<22} {r['ppl']:>12.3f} {r['ppl'] / dense.ppl:>8.2f}  {removed}{spread}")
        if out is None:
            if as_json:
                typer.echo(json.dumps(report, indent=2))
            return

    influence = None
    if explicit is not None:
        order, used_metric = explicit, "explicit"
    elif metric in BASELINES:
        order, used_metric = removal_order(metric, remove, n_layers=n_layers, seed=seed), metric
    else:
        scores, influence = scores_for(metric)
        order, used_metric = removal_order(scores, remove), metric
    pruned = remove_layers(m, order)
    after = evaluate(pruned)
    record = pruning_record(removed_layers=order, n_layers_before=n_layers, metric=used_metric,
                            perplexity={"before": dense.to_dict(), "after": after.to_dict()})
    if influence is not None:
        record.update(scores=scores.tolist(), shortgpt_compat=influence.shortgpt_compat, calibration=influence.source,
                      calibration_tokens=influence.n_tokens)
    folder = save_pretrained(pruned, out, pruning_info=record, force=force)
    report.update(removed_layers=order, metric=used_metric, after=after.to_dict(), out=str(folder))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(f"removed {len(order)} of {n_layers} layers by {used_metric}: {', '.join(map(str, order))}")
        typer.echo(f"held-out perplexity: {dense.ppl:.4f} -> {after.ppl:.4f} (x{after.ppl / dense.ppl:.2f}; {after.source})")
        typer.echo(f"saved {folder} (loads with transformers.AutoModelForCausalLM.from_pretrained)")


def register(app: typer.Typer) -> None:
    app.command("bi")(bi)
    app.command("prune")(prune)
    app.command("ppl")(ppl)
