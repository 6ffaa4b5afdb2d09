"""What a cut changed inside the model: the dense and the pruned model on the same tokens, block by block, with the
pruned model's blocks placed at their original index (`model.layer_origin`), so a reader sees which layers took over
what the removed ones did.

Per original block l (None where the pruned model has no block l):
- lens agreement: share of positions where the logit lens at block l's output (`analyses.logit_lens`) already predicts
  the model's own final top-1 token; and, for the pruned model, agreement with the *dense* model's final prediction;
- sink mass: mean over heads of the attention that queries past the first k tokens put on those k keys
  (`analyses.positional.attention_statistics`);
- first-token ratio: E||h|| of the first token over the median over positions at block l's output (massive activations);
- positional R²: the variance of the residual stream explained by position (`analyses.positional`).
Plus the overall agreement of the two models' final top-1 predictions and the perplexity of both on those tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from residscope.model.errors import InputError


@dataclass
class CutComparison:
    n_layers: int  # blocks of the dense model
    removed: list[int]  # original indices of the blocks the pruned model lacks
    n_tokens: int  # positions compared (per statistic)
    lens_agreement_dense: list[float]
    lens_agreement_pruned: list[float | None]
    lens_agreement_pruned_vs_dense: list[float | None]  # pruned lens vs the dense model's final top-1
    sink_mass_dense: list[float | None]
    sink_mass_pruned: list[float | None]
    first_token_ratio_dense: list[float]
    first_token_ratio_pruned: list[float | None]
    positional_r2_dense: list[float]
    positional_r2_pruned: list[float | None]
    final_top1_agreement: float  # share of positions where both models' final top-1 tokens agree
    ppl_dense: float
    ppl_pruned: float
    source: str
    first_k: int

    def to_dict(self) -> dict:
        return asdict(self)


def restore_layer_origin(model) -> bool:
    """A pruned checkpoint loads as a plain n-layer model; its `residscope_pruning.json` (written by `save_pretrained`)
    says which original block each one was. Put that back into `model.layer_origin` / `n_layers_original`; returns
    whether a record was found."""
    import json
    from pathlib import Path

    from residscope.model.export import PRUNING_FILE

    record_file = Path(str(model.source or "")) / PRUNING_FILE
    if not record_file.is_file():
        return False
    try:
        record = json.loads(record_file.read_text())
        kept, before = [int(i) for i in record["kept_layers"]], int(record["n_layers_before"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{record_file}: unreadable pruning record ({e})") from None
    if len(kept) != model.cfg.n_layers or not all(0 <= i < before for i in kept):
        raise InputError(f"{record_file}: kept_layers {kept} do not fit this {model.cfg.n_layers}-layer model")
    model.layer_origin, model.n_layers_original = kept, before
    return True


def _by_origin(values: list, origin: list[int], n_layers: int) -> list:
    """Per-block values of a pruned model placed at their original block indices (None elsewhere)."""
    out: list = [None] * n_layers
    for i, o in enumerate(origin):
        out[o] = values[i]
    return out


def _lens_agreement(model, batches, reference_top1: list[torch.Tensor] | None = None):
    """([block] share of positions whose lens top-1 equals the final top-1, [block] the same against reference_top1,
    the final top-1 per sequence)."""
    from residscope.analyses.logit_lens import logit_lens

    own = torch.zeros(model.cfg.n_layers, dtype=torch.float64)
    ref = torch.zeros(model.cfg.n_layers, dtype=torch.float64)
    finals, n, k = [], 0, 0
    for batch in batches:
        for row in batch:
            lens = logit_lens(model, row[None].to(model.device))
            final = lens.logits.argmax(-1)  # [pos]
            own += (lens.top_ids == final).double().sum(-1).cpu()
            if reference_top1 is not None:
                ref += (lens.top_ids == reference_top1[k].to(lens.top_ids.device)).double().sum(-1).cpu()
            finals.append(final.cpu())
            n += final.numel()
            k += 1
    return (own / n).tolist(), (ref / n).tolist() if reference_top1 is not None else None, finals, n


def _block_statistics(model, batches, first_k: int):
    """Per block: mean sink mass over heads (None without attention), first-token ratio and positional R² at its
    output."""
    from residscope.analyses.positional import attention_statistics, decompose_positions, describe_positions

    attn = attention_statistics(model, batches, first_k=first_k, progress=False)
    has_attn = set(model.attention_layers())
    sink = [float(attn.sink_mass[i].mean()) if i in has_attn else None for i in range(model.cfg.n_layers)]
    desc = describe_positions(decompose_positions(model, batches, progress=False), first_k=first_k)
    ratio = desc.first_token_ratio[1:, 0].tolist()  # residual layers 1.. = block outputs
    r2 = desc.positional_r2_after_first_k[1:].tolist()
    return sink, ratio, r2


def cut_comparison(dense, pruned, *, seq_len: int = 128, samples: int = 8, seed: int = 0, first_k: int = 4,
                   batch_size: int = 4) -> CutComparison:
    """Compare `dense` and `pruned` (a copy of it with blocks removed) on the same held-out token batches."""
    from residscope.analyses.corpus import calibration_batches
    from residscope.analyses.perplexity import perplexity

    if dense.tokenizer is None:
        raise InputError("the cut comparison needs the dense model's tokenizer (it reads held-out text)")
    if dense.cfg.n_layers != pruned.n_layers_original or any(o >= dense.cfg.n_layers for o in pruned.layer_origin):
        raise InputError(f"--baseline has {dense.cfg.n_layers} layers but the pruned model came from a "
                         f"{pruned.n_layers_original}-layer model: compare a model with the one it was cut from")
    if list(dense.layer_origin) != list(range(dense.cfg.n_layers)):
        raise InputError("--baseline must be the dense model (it has removed layers itself)")
    batches, source = calibration_batches(dense, seq_len=seq_len, samples=samples, batch_size=batch_size, seed=seed,
                                          split="evaluation")
    n_layers, origin = dense.cfg.n_layers, [int(o) for o in pruned.layer_origin]
    own_dense, _, finals_dense, n_tokens = _lens_agreement(dense, batches)
    own_pruned, vs_dense, finals_pruned, _ = _lens_agreement(pruned, batches, finals_dense)
    agree = sum(int((a == b).sum()) for a, b in zip(finals_dense, finals_pruned)) / n_tokens
    sink_d, ratio_d, r2_d = _block_statistics(dense, batches, first_k)
    sink_p, ratio_p, r2_p = _block_statistics(pruned, batches, first_k)
    return CutComparison(
        n_layers=n_layers, removed=[i for i in range(n_layers) if i not in origin], n_tokens=n_tokens,
        lens_agreement_dense=own_dense, lens_agreement_pruned=_by_origin(own_pruned, origin, n_layers),
        lens_agreement_pruned_vs_dense=_by_origin(vs_dense, origin, n_layers),
        sink_mass_dense=sink_d, sink_mass_pruned=_by_origin(sink_p, origin, n_layers),
        first_token_ratio_dense=ratio_d, first_token_ratio_pruned=_by_origin(ratio_p, origin, n_layers),
        positional_r2_dense=r2_d, positional_r2_pruned=_by_origin(r2_p, origin, n_layers),
        final_top1_agreement=agree, ppl_dense=perplexity(dense, batches, progress=False).ppl,
        ppl_pruned=perplexity(pruned, batches, progress=False).ppl, source=source, first_k=first_k,
    )


def cut_table(c: CutComparison) -> str:
    """Plain-text rows per original block: dense / pruned for each statistic ('-' where the block was removed)."""
    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    lines = [f"the cut, block by block (original numbering; removed {', '.join(map(str, c.removed)) or 'nothing'}; "
             f"{c.n_tokens} positions of {c.source})",
             f"final top-1 agreement {c.final_top1_agreement:.3f}; perplexity {c.ppl_dense:.3f} -> {c.ppl_pruned:.3f}",
             f"{'block':>5}  {'lens=final d/p':>15}  {'p vs dense':>10}  {'sink d/p':>13}  {'tok0 ratio d/p':>16}  "
             f"{'pos R2 d/p':>13}"]
    for i in range(c.n_layers):
        lines.append(
            f"{i:>5}  {f(c.lens_agreement_dense[i]):>7}/{f(c.lens_agreement_pruned[i]):<7}  "
            f"{f(c.lens_agreement_pruned_vs_dense[i]):>10}  {f(c.sink_mass_dense[i]):>6}/{f(c.sink_mass_pruned[i]):<6}  "
            f"{f(c.first_token_ratio_dense[i], '{:.1f}'):>8}/{f(c.first_token_ratio_pruned[i], '{:.1f}'):<7}  "
            f"{f(c.positional_r2_dense[i]):>6}/{f(c.positional_r2_pruned[i]):<6}")
    return "\n".join(lines)
