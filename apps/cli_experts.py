"""`residscope experts` (routing statistics, specialisation, expert logit attribution of a mixture-of-experts model)
and `residscope prune-experts` (keep k of E experts per layer, report held-out perplexity, save a standard checkpoint).
Heavy imports happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from residscope.model.errors import InputError

from .cli_common import (BATCH, DATASET, DEVICE, DTYPE, EVAL_SAMPLES, FORCE, JSON, MODEL, NPROC, OFFLOAD, OUT_CHECKPOINT,
                         SAMPLES, SEED, SEQ_LEN, TEXT, calibration_and_heldout, echo_err, load,
                         model_name, n_batches)
from .cli_output import json_text


def _stats_table(st, attribution, tokenizer) -> str:
    lines = [f"routing over {st.n_tokens} tokens ({st.source}); {st.n_experts} experts, top-{st.top_k}",
             f"{'layer':>5} {'entropy':>8} {'top-k mass':>10} {'imbalance':>9} {'max load':>8} {'min load':>8} "
             f"{'shared gate':>11} {'agree->next':>11}"]
    for r, i in enumerate(st.layers):
        gate = f"{float(st.shared_gate_mean[r]):.3f}" if st.shared_gate_mean is not None else "-"
        agree = f"{float(st.agreement_nmi[r]):.3f}" if r < len(st.agreement_nmi) else "-"
        lines.append(f"{i:>5} {float(st.entropy[r]):>8.3f} {float(st.topk_mass[r]):>10.3f} {float(st.imbalance[r]):>9.3f} "
                     f"{float(st.load[r].max()):>8.3f} {float(st.load[r].min()):>8.3f} {gate:>11} {agree:>11}")
    last = len(st.layers) - 1
    lines.append(f"layer {st.layers[last]}: top tokens of its three busiest experts")
    for e in st.load[last].argsort(descending=True)[:3].tolist():
        toks = ", ".join(f"{_tok(tokenizer, t)} {share:.0%}" for t, share in st.top_tokens[last][e][:5])
        lines.append(f"  expert {e:>3} (load {float(st.load[last][e]):.3f}): {toks}")
    if attribution is not None:
        lines.append("direct logit attribution to the next token (mean per token), strongest expert per layer:")
        for r, i in enumerate(attribution.layers):
            e = int(attribution.per_expert[r].abs().argmax())
            lines.append(f"  layer {i:>3}: expert {e} {float(attribution.per_expert[r][e]):+.4f}; whole MLP "
                         f"{float(attribution.mlp_total[r]):+.4f}")
    return "\n".join(lines)


def _tok(tokenizer, t: int) -> str:
    return repr(tokenizer.decode([t])) if tokenizer is not None else str(t)


def experts(
    model: Optional[str] = MODEL,
    seq_len: int = SEQ_LEN,
    samples: int = SAMPLES,
    batch_size: int = BATCH,
    seed: int = SEED,
    text: Optional[Path] = TEXT,
    dataset: Optional[str] = DATASET,
    attribution: bool = typer.Option(True, "--attribution/--no-attribution",
                                     help="also measure each expert's direct logit attribution (a second pass)"),
    position_buckets: int = typer.Option(8, "--position-buckets", help="buckets of positions for routing by position"),
    as_json: bool = JSON,
    dtype: str = DTYPE,
    device: str = DEVICE,
    nproc: int = NPROC,
    offload: bool = OFFLOAD,
) -> None:
    """Routing statistics of a mixture-of-experts model: expert load, routing entropy, top-k mass, load imbalance, the
    shared expert's gate, REAP saliency, routing by position and across layers, top tokens per expert, and each
    expert's logit attribution."""
    from residscope.analyses.corpus import calibration_batches
    from residscope.analyses.experts import expert_attribution, require_moe, routing_statistics
    from residscope.apps import workers

    if position_buckets < 1:
        raise InputError(f"--position-buckets must be >= 1, got {position_buckets}")
    if workers.launched(experts, locals(), nproc=nproc, n_batches=n_batches(samples, batch_size)):
        return
    device = workers.join(device, n_batches=n_batches(samples, batch_size))
    m = load(model, device, dtype, offload)
    require_moe(m)
    batches, source = calibration_batches(m, seq_len=seq_len, samples=samples, batch_size=batch_size, seed=seed,
                                          text_file=text, dataset=dataset)
    st = routing_statistics(m, batches, position_buckets=position_buckets, source=source)
    attr = expert_attribution(m, batches) if attribution else None
    if not workers.is_main():
        return
    if as_json:
        typer.echo(json_text({"model": model_name(model), "routing": st.to_dict(),
                              "attribution": attr.to_dict() if attr is not None else None}))
    else:
        typer.echo(_stats_table(st, attr, m.tokenizer))


def prune_experts(
    model: Optional[str] = MODEL,
    keep: int = typer.Option(..., "--keep", help="experts kept per mixture-of-experts layer"),
    criterion: str = typer.Option("reap", "--criterion", help="frequency, weight, reap or reconstruction"),
    out: Optional[Path] = OUT_CHECKPOINT,
    force: bool = FORCE,
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
) -> None:
    """Keep --keep of the experts in every MoE layer (chosen by --criterion on calibration text), report held-out
    perplexity before and after, and save a standard checkpoint (num_experts lowered, router rows removed)."""
    from residscope.analyses.perplexity import perplexity
    from residscope.common.atomic import check_output_dir
    from residscope.surgery.experts import CRITERIA, check_keep, choose_experts, expert_pruning_record, prune_experts as cut

    if criterion not in CRITERIA:
        raise InputError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if out is None:
        raise InputError("--out is required (the folder for the pruned checkpoint)")
    check_output_dir(out, "--out", force=force)  # before the slow part
    m = load(model, device, dtype)
    check_keep(m, keep)
    (calib, calib_source), (evals, eval_source) = calibration_and_heldout(
        m, seq_len=seq_len, samples=samples, eval_samples=eval_samples, batch_size=batch_size, seed=seed, text=text,
        dataset=dataset)
    before = perplexity(m, evals)
    choice = choose_experts(m, calib, keep, criterion)
    pruned = cut(m, choice.keep, copy=False)
    after = perplexity(pruned, evals)
    record = {**expert_pruning_record(choice, pruned), "calibration": calib_source,
              "perplexity": {"before": before.ppl, "after": after.ppl, "evaluation": eval_source}}
    folder = pruned.save_pretrained(out, pruning_info=record, force=force)
    if as_json:
        typer.echo(json_text({"model": model_name(model), **record, "out": str(folder)}))
        return
    typer.echo(f"kept {keep} of {choice.n_experts_before} experts per layer by {criterion}")
    typer.echo(f"held-out perplexity: {before.ppl:.4f} -> {after.ppl:.4f} (x{after.ppl / before.ppl:.2f}; {eval_source})")
    echo_err(f"saved {folder} (loads with transformers.AutoModelForCausalLM.from_pretrained)")


def register(app: typer.Typer) -> None:
    app.command("experts")(experts)
    app.command("prune-experts")(prune_experts)
