"""`residscope positional`: positional vectors, attention sinks, removal of positional vectors and linear probes
(Dong et al., NeurIPS 2024). Writes a JSON summary, the positional vectors (safetensors) and plotly HTML figures to --out;
every file is written to a temporary name, then renamed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def _parse_layers(spec: str, n_resid_layers: int) -> list[int]:
    try:
        layers = [int(x) for x in spec.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ValueError(f"--remove-layers: expected comma-separated layer indices like 1,4,15; got {spec!r}") from None
    for layer in layers:
        if not 0 <= layer < n_resid_layers:
            raise ValueError(f"--remove-layers: layer {layer} out of range 0..{n_resid_layers - 1} (0 = embeddings)")
    return layers


def _round(x, digits: int = 4):
    import numpy as np

    return np.round(np.asarray(x, dtype=float), digits).tolist()


def positional(
    model: str = typer.Option("smollm2-135m", "--model", help="checkpoint folder, GGUF file or alias"),
    samples: int = typer.Option(64, "--samples", help="calibration sequences for the decomposition"),
    seq_len: int = typer.Option(128, "--seq-len", help="tokens per sequence"),
    out: Path = typer.Option(..., "--out", help="output folder (created if missing)"),
    batch_size: int = typer.Option(8, "--batch-size"),
    seed: int = typer.Option(0, "--seed", help="seed of the chunk order"),
    text: Optional[Path] = typer.Option(None, "--text", help=".txt or .jsonl text file instead of the built-in corpus"),
    first_k: int = typer.Option(4, "--first-k", help="initial tokens counted as sinks / positional basis"),
    cos_threshold: float = typer.Option(0.95, "--cos-threshold", help="cosine at which positional vectors count as one"),
    remove_layers: str = typer.Option("1,4", "--remove-layers",
                                      help="residual layers (0 = embeddings) at which to remove positional vectors, one "
                                           "experiment per layer; empty to skip"),
    eval_samples: int = typer.Option(16, "--eval-samples", help="held-out sequences for perplexity with/without removal"),
    probe_tokens: int = typer.Option(4096, "--probe-tokens", help="token cap for probe activations (0 = no probes)"),
    as_json: bool = typer.Option(False, "--json", help="print the JSON summary instead of a table"),
    dtype: str = typer.Option("float32", "--dtype"),
    device: str = typer.Option("cpu", "--device"),
    nproc: int = typer.Option(1, "--nproc", help="local data-parallel workers (torch.distributed); or start under torchrun"),
    offload: bool = typer.Option(False, "--offload", help="keep the blocks on disk and stream them one at a time"),
) -> None:
    """Decompose the residual stream into positional vectors, measure sinks and decay, remove positional vectors, probe."""
    from residscope.analyses import positional_plots as plots
    from residscope.analyses.corpus import calibration_batches
    from residscope.analyses.positional import attention_statistics, decompose_positions, describe_positions, removal_study
    from residscope.apps import workers
    from residscope.model import load_model
    from residscope.probes.linear import collect_activations, first_tokens_probe, position_probe

    if first_k < 1 or first_k > seq_len:
        raise ValueError(f"--first-k must be in 1..--seq-len ({seq_len}), got {first_k}")
    if not 0 < cos_threshold <= 1:
        raise ValueError(f"--cos-threshold must be in (0, 1], got {cos_threshold}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")
    n_batches = -(-samples // batch_size) if samples > 0 and batch_size > 0 else 1
    if workers.launched(positional, locals(), nproc=nproc, n_batches=n_batches):
        return
    device = workers.join(device, n_batches=n_batches)
    m = load_model(model, device=device, dtype=dtype, offload=offload)
    layers = _parse_layers(remove_layers, m.cfg.n_layers + 1)
    batches, source = calibration_batches(m, seq_len=seq_len, samples=samples, batch_size=batch_size, seed=seed,
                                          text_file=text)
    progress = not as_json
    dec = decompose_positions(m, batches, progress=progress)
    desc = describe_positions(dec, cos_threshold=cos_threshold, first_k=first_k)
    att = attention_statistics(m, batches, first_k=first_k, progress=progress)
    rows = []
    if layers:
        # held-out text: the evaluation split of the built-in corpus, or the same user file with another chunk order
        ev, _ = calibration_batches(m, seq_len=seq_len, samples=eval_samples, batch_size=batch_size, seed=seed + 1,
                                    split="evaluation", text_file=text)
        rows = removal_study(m, dec, ev, [([layer], None) for layer in layers] + [([layer], first_k) for layer in layers],
                             sink_k=first_k, progress=progress)
    if not workers.is_main():  # the probes need every activation in one place: rank 0 collects them alone
        return
    probes = []
    if probe_tokens > 0:
        acts = collect_activations(m, batches, max_tokens=probe_tokens, progress=progress)
        probes = [position_probe(acts, progress=progress), first_tokens_probe(acts, first_k, progress=progress)]

    summary = dict(
        model=str(model), source=source, n_samples=dec.n_samples, seq_len=dec.seq_len, first_k=first_k,
        cos_threshold=cos_threshold, layers="0 = embeddings (blocks.0.hook_resid_pre), l = blocks.{l-1}.hook_resid_post",
        positional=dict(
            positional_share=_round(desc.positional_share), positional_r2=_round(desc.positional_r2),
            positional_r2_after_first_k=_round(desc.positional_r2_after_first_k),
            n_distinct=desc.n_distinct.tolist(), first_token_ratio=_round(desc.first_token_ratio[:, 0], 2),
            first_k_token_ratio=_round(desc.first_token_ratio, 2), mean_vector_norm=_round(dec.mean_vector.norm(dim=-1), 3),
            pca_explained=_round(desc.pca_explained, 3)),
        attention=dict(sink_mass_by_block=_round(att.sink_mass.mean(-1)), sink_mass_by_head=_round(att.sink_mass),
                       decay_ratio_by_block=_round(att.decay_ratio().mean(-1), 3)),
        removal=[dict(label=r.label, layers=list(r.layers), first_k=r.first_k, ppl=round(r.ppl, 4), nll=round(r.nll, 5),
                      sink_mass=round(float(r.sink_mass.mean()), 4), decay_ratio=round(float(r.decay_ratio.mean()), 3))
                 for r in rows],
        probes=[p.to_dict() for p in probes],
    )
    from residscope.model.atomic import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    figures = {"norms.html": plots.norms_heatmap(desc), "similarity.html": plots.similarity_matrices(desc),
               "pca.html": plots.pca_trajectories(desc), "layers.html": plots.layer_summary(desc),
               "sinks.html": plots.sink_mass(att), "distance.html": plots.attention_by_distance(att)}
    if rows:
        figures["removal.html"] = plots.removal_effects(rows)
    if probes:
        figures["probes.html"] = plots.probe_scores(probes)
    for name, fig in figures.items():
        atomic_write(out / name, lambda p, fig=fig: fig.write_html(str(p), include_plotlyjs="cdn"))
    dec.save(out / "positional_vectors.safetensors")
    summary["files"] = sorted([*figures, "positional_vectors.safetensors", "summary.json"])
    atomic_write(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=1)))

    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    pos = summary["positional"]
    sink = summary["attention"]["sink_mass_by_block"]
    lines = [f"positional vectors of {model}: {dec.n_samples} x {dec.seq_len} tokens ({source})",
             f"{'layer':>5}  {'share':>7}  {'R2':>6}  {'R2 t>=k':>7}  {'distinct':>8}  {'tok0/median':>11}  {'sink (block l)':>14}"]
    for layer in range(dec.n_resid_layers):
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
    typer.echo("\n".join(lines))


def register(app: typer.Typer) -> None:
    app.command("positional")(positional)
