"""`residscope evaluate` (offline generative / cloze / passkey tasks, before-vs-after a cut, the logit-lens and sink view
of the cut, lm-evaluation-harness tasks) and `residscope export --gguf` (GGUF for llama.cpp). Heavy imports happen
inside the commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from residscope.model.errors import InputError

from .cli_common import BATCH, DEVICE, DTYPE, JSON, MODEL, echo_err, load, model_name
from .cli_output import json_text


def _write_json(path: Path, data: dict) -> None:
    from residscope.common.atomic import atomic_write_text

    atomic_write_text(path, json_text(data, indent=2) + "\n")


def _load_report(path: Path):
    from residscope.analyses.corpus import read_utf8
    from residscope.analyses.evaluation import EvaluationReport

    try:
        return EvaluationReport.from_dict(json.loads(read_utf8(path)))
    except json.JSONDecodeError as e:
        raise InputError(f"--baseline {path}: not JSON ({e.msg} at line {e.lineno})") from None
    except InputError as e:
        raise InputError(f"--baseline {path}: {e}") from None


def evaluate(
    model: Optional[str] = MODEL,
    tasks: str = typer.Option("addition,brackets,cloze,passkey", "--tasks",
                              help="comma-separated: addition, brackets, cloze, passkey (or all)"),
    n: int = typer.Option(32, "--n", help="items per task (cloze: at most 64; passkey: n/3 keys at 3 depths)"),
    seed: int = typer.Option(0, "--seed", help="seed of the generated items (same seed = same items)"),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="the model before the cut (alias, folder, .gguf), "
                                           "or a JSON report written by --out: adds a before/after table"),
    cut: bool = typer.Option(False, "--cut", help="with --baseline: also compare per-layer logit-lens agreement and "
                             "sink / positional statistics of both models on the same tokens, by original layer"),
    lm_eval_tasks: Optional[str] = typer.Option(None, "--lm-eval", help="also run these lm-evaluation-harness tasks "
                                                "(e.g. hellaswag,mmlu, needs lm-eval and its datasets; or residscope's "
                                                "own offline ones: residscope_addition,residscope_cloze,...)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="lm-eval: items per task"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the JSON report here (atomically)"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out file"),
    as_json: bool = JSON,
    batch_size: int = BATCH,
    dtype: str = DTYPE,
    device: str = DEVICE,
) -> None:
    """Offline tasks pruning breaks (multi-digit addition, bracket closing, LAMBADA-style cloze, passkey), greedy and
    seeded; before vs after a cut with --baseline."""
    from residscope.analyses.evaluation import compare_reports, evaluate_model, parse_tasks, report_table
    from residscope.common.atomic import check_output_file

    task_list = parse_tasks(tasks)
    if n < 1:
        raise InputError(f"--n must be >= 1 (items per task), got {n}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    if cut and baseline is None:
        raise InputError("--cut needs --baseline (the model before the cut)")
    if out is not None:
        out = check_output_file(out, "--out")
        if out.exists() and not force:
            raise InputError(f"--out: {out} exists (pass --force to replace it)")
    if lm_eval_tasks is not None:
        from residscope.analyses.evaluation import TASKS

        for t in lm_eval_tasks.split(","):
            if t.strip().startswith("residscope_") and t.strip().removeprefix("residscope_") not in TASKS:
                raise InputError(f"--lm-eval: unknown task {t.strip()!r} (residscope's: "
                                 f"{', '.join('residscope_' + k for k in TASKS)})")
    base_report, base_model = None, None
    if baseline is not None and baseline.endswith(".json") and Path(baseline).is_file():
        if cut:
            raise InputError("--cut needs the baseline model itself, not a JSON report")
        base_report = _load_report(Path(baseline))
    m = load(model, device, dtype)
    from residscope.surgery.cut_lens import restore_layer_origin

    restore_layer_origin(m)  # a pruned checkpoint's blocks keep their original numbers in the report
    report = evaluate_model(m, task_list, n=n, seed=seed, batch_size=batch_size, name=model_name(model), progress=True)
    if baseline is not None and base_report is None:
        base_model = load(baseline, device, dtype)
        base_report = evaluate_model(base_model, task_list, n=n, seed=seed, batch_size=batch_size, name=baseline,
                                     progress=True)
    data = report.to_dict()
    if base_report is not None:
        data["baseline"] = base_report.to_dict()
        data["comparison"] = [vars(r) for r in compare_reports(base_report, report)]
    if cut:
        from residscope.surgery.cut_lens import cut_comparison, cut_table

        comparison = cut_comparison(base_model, m)
        data["cut"] = comparison.to_dict()
    if lm_eval_tasks:
        from residscope.analyses.lm_eval_model import run_lm_eval

        data["lm_eval"] = run_lm_eval(m, lm_eval_tasks.split(","), limit=limit, batch_size=batch_size, n=n, seed=seed)
    if out is not None:
        _write_json(out, data)
        echo_err(f"wrote {out}")
    if as_json:
        typer.echo(json_text(data, indent=2))
        return
    typer.echo(report_table(report, base_report))
    if cut:
        typer.echo(cut_table(comparison))
    if lm_eval_tasks:
        typer.echo(json_text(data["lm_eval"], indent=2))


def export(
    model: Optional[str] = MODEL,
    gguf: Path = typer.Option(..., "--gguf", help="the GGUF file to write"),
    quant: str = typer.Option("f32", "--quant", help="f32, f16, q8_0 or q4_0"),
    force: bool = typer.Option(False, "--force", help="replace an existing file"),
    as_json: bool = JSON,
    dtype: str = DTYPE,
) -> None:
    """Write a model (dense or pruned) as one GGUF file for llama.cpp, tokenizer included."""
    from residscope.model.gguf_export import check_gguf_target, check_quant, write_gguf

    check_quant(quant)
    check_gguf_target(gguf, force=force)  # before loading anything
    m = load(model, "cpu", dtype)
    result = write_gguf(m, gguf, quant=quant, force=force)
    if as_json:
        typer.echo(json_text(result.to_dict(), indent=2))
    else:
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(result.tensor_types.items()))
        typer.echo(f"wrote {result.path}: {result.n_layers} layers, {result.n_tensors} tensors ({kinds}), "
                   f"{result.n_bytes / 2**20:.1f} MiB, tokenizer pre {result.tokenizer_pre}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
    app.command("export")(export)
