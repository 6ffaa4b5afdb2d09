"""`residscope demo`: the main job on the bundled model, end to end, in a couple of minutes on a laptop CPU.

Open the model, let it talk, measure held-out perplexity, score every block by ShortGPT's Block Influence, cut the least
influential quarter, export the pruned model as a standard checkpoint, and say how far its RoPE reaches.
Every step calls the same library functions as the dedicated commands.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import typer

from residscope.model.errors import InputError

from .cli_common import MODEL, inputs_of, load, model_name
from .cli_output import json_text


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        model: Optional[str] = MODEL,
        out: Path = typer.Option(Path("out/demo"), "--out", help="Folder for the pruned checkpoint and summary.json "
                                 "(created; must be empty unless --force)."),
        force: bool = typer.Option(False, "--force", help="replace a non-empty --out folder (e.g. an earlier demo's)"),
        seq_len: int = typer.Option(256, "--seq-len", help="Tokens per calibration/evaluation chunk."),
        samples: int = typer.Option(16, "--samples", help="Chunks for Block Influence and for perplexity."),
        remove_fraction: float = typer.Option(0.25, "--remove-fraction", help="Fraction of layers to remove."),
        prompt: str = typer.Option("The capital of France is", "--prompt"),
    ) -> None:
        """Run the main job on the bundled model: generate, perplexity, Block Influence, prune, export, RoPE bound."""
        import torch

        from residscope.analyses.corpus import calibration_batches
        from residscope.analyses.perplexity import heldout_perplexity
        from residscope.analyses.rope_bound import model_bounds
        from residscope.common.atomic import atomic_dir, check_output_dir
        from residscope.surgery.export import pruning_record, save_pretrained
        from residscope.surgery.influence import block_influence_result, removal_order
        from residscope.surgery.removal import remove_layers

        if not 0 < remove_fraction < 1:
            raise InputError(f"--remove-fraction must be in (0, 1), got {remove_fraction}")
        out = check_output_dir(out, "--out", force=force, inputs=inputs_of(model))  # before any work
        model = model_name(model)
        summary: dict = {"model": model}

        t0 = time.perf_counter()
        lm = load(model)
        summary["load_seconds"] = round(time.perf_counter() - t0, 2)
        cfg = lm.cfg
        typer.echo(f"[1/6] loaded {model}: {cfg.model_type}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
                   f"{cfg.n_heads}/{cfg.n_kv_heads} heads ({summary['load_seconds']} s)")

        ids = lm.to_tokens(prompt)
        continuation = lm.to_string(lm.generate(ids, max_new_tokens=12)[0, ids.shape[1]:])
        summary["generation"] = {"prompt": prompt, "continuation": continuation}
        typer.echo(f"[2/6] {prompt!r} -> {continuation!r}")

        with torch.inference_mode():
            dense = heldout_perplexity(lm, seq_len=seq_len, samples=samples, progress=False)
        summary["perplexity_dense"] = dense.ppl
        typer.echo(f"[3/6] held-out perplexity {dense.ppl:.3f} on {dense.source}")

        batches, source = calibration_batches(lm, seq_len=seq_len, samples=samples, batch_size=4)
        influence = block_influence_result(lm, batches, "bi", progress=False, source=source)
        n_remove = max(1, round(remove_fraction * cfg.n_layers))
        removed = removal_order(influence, n_remove)
        summary["block_influence"] = [round(float(s), 5) for s in influence.scores]
        summary["removed_layers"] = removed
        typer.echo(f"[4/6] Block Influence on {source}: least influential layers {removed}")

        pruned = remove_layers(lm, removed)
        with torch.inference_mode():
            after = heldout_perplexity(pruned, seq_len=seq_len, samples=samples, progress=False)
        summary["perplexity_pruned"] = after.ppl
        record = pruning_record(removed_layers=removed, n_layers_before=cfg.n_layers, influence=influence,
                                perplexity={"dense": dense.ppl, "pruned": after.ppl})
        folder = out / "pruned"
        summary["pruned_checkpoint"] = str(folder)
        typer.echo(f"[5/6] removed {n_remove}/{cfg.n_layers} layers: perplexity {dense.ppl:.3f} -> {after.ppl:.3f} "
                   f"(checkpoint: {folder})")

        if cfg.positional == "rope":
            bounds = model_bounds(cfg)
            summary["rope_bounds"] = [dataclasses.asdict(b) for b in bounds]
            for b in bounds:
                typer.echo(f"[6/6] RoPE ({b.layer_kind}): base {b.base:g}, head dim {b.head_dim}: B(m) >= 0 up to "
                           f"m = {b.bound.bound} tokens, vs max positions {cfg.max_position_embeddings}")

        summary_json = json_text(summary, default=str)
        with atomic_dir(out) as tmp:  # the whole folder appears at once (with --force, it replaces the old one whole)
            save_pretrained(pruned, tmp / "pruned", pruning_info=record)
            (tmp / "summary.json").write_text(summary_json)
        typer.echo(f"saved the pruned checkpoint {folder} and the summary {out / 'summary.json'}")
