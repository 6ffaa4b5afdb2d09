"""The positional-vector study of Dong et al. in one call: decompose the residual stream on calibration text, describe
the vectors, measure sinks and attention decay, and (on held-out text) remove the vectors at some layers.

    study = positional_study(model, batches, eval_batches=held_out, remove_layers=[1, 4])
    study.summary()                      # plain numbers, JSON-ready (what `residscope positional` writes)

Probes on the same activations live in `residscope.probes` (`position_probe`, `first_tokens_probe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from residscope.model.errors import InputError

from .positional import (AttentionStatistics, PositionalDecomposition, PositionalDescription, RemovalRow,
                         attention_statistics, decompose_positions, describe_positions, removal_study)

LAYER_NUMBERING = "0 = embeddings (blocks.0.hook_resid_pre), l = blocks.{l-1}.hook_resid_post"


def _round(x, digits: int = 4) -> list:
    return np.round(np.asarray(x, dtype=float), digits).tolist()


@dataclass
class PositionalStudy:
    decomposition: PositionalDecomposition
    description: PositionalDescription
    attention: AttentionStatistics
    removal: list[RemovalRow]  # empty when no layers were given; else the original first, then per layer and setting
    first_k: int
    cos_threshold: float
    source: str | None = None

    def summary(self) -> dict:
        """The study's numbers, rounded, as plain lists (per residual layer, or per block for attention)."""
        dec, desc, att = self.decomposition, self.description, self.attention
        return dict(
            source=self.source, n_samples=dec.n_samples, seq_len=dec.seq_len, first_k=self.first_k,
            cos_threshold=self.cos_threshold, layers=LAYER_NUMBERING,
            positional=dict(
                positional_share=_round(desc.positional_share), positional_r2=_round(desc.positional_r2),
                positional_r2_after_first_k=_round(desc.positional_r2_after_first_k),
                n_distinct=desc.n_distinct.tolist(), first_token_ratio=_round(desc.first_token_ratio[:, 0], 2),
                first_k_token_ratio=_round(desc.first_token_ratio, 2),
                mean_vector_norm=_round(dec.mean_vector.norm(dim=-1), 3), pca_explained=_round(desc.pca_explained, 3)),
            attention=dict(sink_mass_by_block=_round(att.sink_mass.mean(-1)), sink_mass_by_head=_round(att.sink_mass),
                           decay_ratio_by_block=_round(att.decay_ratio().mean(-1), 3)),
            removal=[dict(label=r.label, layers=list(r.layers), first_k=r.first_k, ppl=round(r.ppl, 4),
                          nll=round(r.nll, 5), sink_mass=round(float(r.sink_mass.mean()), 4),
                          decay_ratio=round(float(r.decay_ratio.mean()), 3)) for r in self.removal],
        )


def positional_study(model, batches: Sequence[torch.Tensor], *, first_k: int = 4, cos_threshold: float = 0.95,
                     remove_layers: Sequence[int] = (), eval_batches: Sequence[torch.Tensor] | None = None,
                     source: str | None = None, progress: bool = True) -> PositionalStudy:
    """Decompose and describe the positional vectors of `model` on `batches`, measure attention sinks, and for each
    layer in `remove_layers` (residual numbering) remove its vectors on `eval_batches`, at all positions and at the
    first `first_k` only."""
    if first_k < 1:
        raise InputError(f"first_k must be >= 1, got {first_k}")
    if not 0 < cos_threshold <= 1:
        raise InputError(f"cos_threshold must be in (0, 1], got {cos_threshold}")
    if remove_layers and eval_batches is None:
        raise InputError("remove_layers needs eval_batches (held-out text)")
    dec = decompose_positions(model, batches, progress=progress)
    desc = describe_positions(dec, cos_threshold=cos_threshold, first_k=first_k)
    att = attention_statistics(model, batches, first_k=first_k, progress=progress)
    settings = [([layer], None) for layer in remove_layers] + [([layer], first_k) for layer in remove_layers]
    rows = removal_study(model, dec, eval_batches, settings, sink_k=first_k, progress=progress) if remove_layers else []
    return PositionalStudy(decomposition=dec, description=desc, attention=att, removal=rows, first_k=first_k,
                           cos_threshold=cos_threshold, source=source)
