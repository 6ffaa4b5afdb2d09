"""`residscope heal`: fine-tune a pruned model on the calibration split (partial fine-tuning of the last blocks and
lm_head, or LoRA merged afterwards), or replace a dense model's most redundant span of blocks by one trained block
(LLM-Streamline, `--method streamline --remove N`), with a held-out perplexity curve, and save a checkpoint
transformers loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from residscope.model.errors import InputError

from .cli_common import (DATASET, DEVICE, DTYPE, FORCE, JSON, SEED, TEXT, calibration_and_heldout, echo_err,
                         eval_samples_option, load, model_name, parse_list, samples_option)
from .cli_output import json_text


def _pruning_record(model: Optional[str]) -> dict | None:
    """The residscope_pruning.json of a checkpoint folder, if the model is one that has it."""
    from residscope.surgery import PRUNING_FILE

    if model is None:
        return None
    path = Path(model).expanduser() / PRUNING_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable pruning record ({e})") from None


def _nothing_removed(record: dict | None) -> bool:
    if record is None:
        return True
    halves = record.get("removed_sublayers") or {}
    return not record.get("removed_layers") and not any(halves.values())


def heal(
    model: Optional[str] = typer.Option(None, "--model", help="the pruned checkpoint folder (from `residscope prune`), "
                                        "or any model residscope loads"),
    out: Path = typer.Option(..., "--out", help="folder for the healed checkpoint"),
    force: bool = FORCE,
    method: str = typer.Option("partial", "--method", help="partial (last --last-k blocks + lm_head), lora, or "
                               "streamline (LLM-Streamline: --remove N blocks, the N + 1 most redundant consecutive "
                               "blocks become one trained block)"),
    remove: Optional[int] = typer.Option(None, "--remove", help="streamline: blocks to remove"),
    streamline_loss: str = typer.Option("relative", "--streamline-loss", help="streamline: relative (each token's "
                                        "squared error over its target's mean square) or mse (the reference's plain "
                                        "MSE, dominated by massive activations where a model has them)"),
    last_k: int = typer.Option(2, "--last-k", help="partial: blocks trained, counted from the top"),
    lora_modules: str = typer.Option("gate_proj,up_proj,down_proj", "--lora-modules",
                                     help="lora: linear layers adapted in every block (q_proj, k_proj, v_proj, o_proj, "
                                          "gate_proj, up_proj, down_proj)"),
    lora_rank: int = typer.Option(8, "--lora-rank"),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha"),
    steps: int = typer.Option(100, "--steps", help="optimizer steps"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="micro-batches per optimizer step"),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW peak learning rate (linear warm-up over 10% of the steps, "
                                                "then linear decay)"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    seq_len: int = typer.Option(128, "--seq-len", help="tokens per training and evaluation sequence"),
    batch_size: int = typer.Option(2, "--batch-size", help="sequences per micro-batch"),
    samples: int = samples_option(256, "calibration-split sequences trained on (cycled)"),
    eval_samples: int = eval_samples_option(8, "held-out evaluation sequences for the curve"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="steps between held-out evaluations "
                                             "(default: 5 points over the run)"),
    seed: int = SEED,
    text: Optional[Path] = TEXT,
    dataset: Optional[str] = DATASET,
    curve_json: Optional[Path] = typer.Option(None, "--curve-json", help="also write the result (curve included) to "
                                              "this JSON file (it is always saved in --out as residscope_healing.json)"),
    as_json: bool = JSON,
    dtype: str = DTYPE,
    device: str = DEVICE,
) -> None:
    """Heal a pruned model by a short fine-tune; report held-out perplexity before, along and after."""
    from residscope.common.atomic import atomic_write_text, check_output_dir, check_output_file
    from residscope.surgery import layer_origin, save_pretrained, streamline
    from residscope.surgery.cut_lens import restore_layer_origin
    from residscope.surgery.heal import check_heal_options, heal as heal_model
    from residscope.surgery.streamline import check_streamline, check_streamline_loss

    modules = parse_list(lora_modules, "--lora-modules", str, "module names like gate_proj,up_proj")
    check_heal_options(method, lora_modules=modules, steps=steps, grad_accum=grad_accum, lr=lr, lora_rank=lora_rank)
    if (method == "streamline") != (remove is not None):
        raise InputError("--remove goes with --method streamline (how many blocks it removes), and only with it")
    check_streamline_loss(streamline_loss)  # before loading anything
    check_output_dir(out, "--out", force=force)
    if curve_json is not None:
        curve_json = check_output_file(curve_json, "--curve-json")
    record = _pruning_record(model)
    nothing_removed = _nothing_removed(record) and method != "streamline"
    if nothing_removed:
        echo_err("note: this model has nothing removed (no removed layers in its residscope_pruning.json); healing "
                 "fine-tunes it as it is")
    m = load(model, device, dtype)
    restore_layer_origin(m)  # a pruned folder: its blocks' original indices, so the saved record stays right
    if remove is not None:
        check_streamline(remove, len(m.blocks), loss=streamline_loss)
    (train, train_source), (evals, eval_source) = calibration_and_heldout(
        m, seq_len=seq_len, samples=samples, eval_samples=eval_samples, batch_size=batch_size, seed=seed, text=text,
        dataset=dataset)
    removed_before = list((record or {}).get("removed_layers", []))
    metric = (record or {}).get("metric")
    if method == "streamline":
        origin = layer_origin(m)
        result = streamline(m, train, evals, remove, loss=streamline_loss, steps=steps, grad_accum=grad_accum,
                            lr=lr, weight_decay=weight_decay, eval_every=eval_every, seed=seed,
                            eval_source=eval_source, train_source=train_source)
        result.streamline["removed_original"] = [origin[i] for i in result.streamline["removed"]]
        result.streamline["start_original"] = origin[result.streamline["start"]]
        removed_before += result.streamline["removed_original"]
        metric = "llm-streamline"
    else:
        result = heal_model(m, train, evals, method=method, last_k=last_k, lora_modules=modules, lora_rank=lora_rank,
                            lora_alpha=lora_alpha, steps=steps, grad_accum=grad_accum, lr=lr,
                            weight_decay=weight_decay, eval_every=eval_every, seed=seed,
                            nothing_removed=nothing_removed, eval_source=eval_source, train_source=train_source)
    summary = {k: v for k, v in result.to_dict().items() if k != "losses"}
    info = {"removed_layers": removed_before, "metric": metric, "pruning": record, "healing": summary,
            "source_model": model_name(model)}
    folder = save_pretrained(m, out, pruning_info=info, force=force)
    text_out = json_text({**result.to_dict(), "model": model_name(model), "out": str(folder)}, indent=2)
    atomic_write_text(folder / "residscope_healing.json", text_out + "\n")
    if curve_json is not None:
        atomic_write_text(curve_json, text_out + "\n")
    if as_json:
        typer.echo(text_out)
        return
    typer.echo(f"healed by {method} ({result.trainable_params:,} trainable parameters, {steps} steps x {grad_accum} "
               f"micro-batches, {result.train_tokens:,} tokens, {result.seconds:.0f} s)")
    if result.streamline is not None:
        span = result.streamline
        typer.echo(f"replaced blocks {span['start_original']}-{span['removed_original'][-1]} (angular distance "
                   f"{span['span_distance']:.4f}) by block {span['start_original']}, trained alone; removed "
                   f"{span['removed_original']}; {span['loss']} stream error {span['mse_before']:.4g} -> "
                   f"{span['mse_after']:.4g}")
    typer.echo(f"{'step':>6} {'train loss':>11} {'held-out ppl':>13}")
    for point in result.curve:
        loss = f"{point['train_loss']:.4f}" if point["train_loss"] is not None else "-"
        typer.echo(f"{point['step']:>6} {loss:>11} {point['ppl']:>13.4f}")
    typer.echo(f"held-out perplexity: {result.before:.4f} -> {result.after:.4f} ({eval_source})")
    if result.note:
        typer.echo(f"note: {result.note}")
    typer.echo(f"saved {folder} (loads with transformers.AutoModelForCausalLM.from_pretrained)")


def register(app: typer.Typer) -> None:
    app.command("heal")(heal)
