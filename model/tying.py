"""Tied embeddings whose checkpoint disagrees: `tie_word_embeddings: true` in config.json, yet the weights file also
holds an `lm_head.weight` with other values than `model.embed_tokens.weight`.

transformers (checked with 5.25) warns "both are present in the checkpoints with different values, so we will NOT tie
them" and computes logits with the file's lm_head. residscope does the same, with one warning line naming the file, so
the two never differ silently: the unembedding becomes a parameter of its own and `cfg.tie_embeddings` turns False (an
export then writes lm_head.weight and `tie_word_embeddings: false`). An lm_head equal to the embedding keeps them tied.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

LM_HEAD = "lm_head.weight"


class TiedHeadWarning(UserWarning):
    """A tied checkpoint whose lm_head differs from its embedding: loaded untied, as transformers does."""


def resolve_tied_head(model, lm_head: torch.Tensor | None, path: Path | None) -> bool:
    """Called after loading a tied model's weights with the file's lm_head (None when the file has none). Unties the
    model when lm_head differs from the loaded embedding; returns whether it did."""
    if lm_head is None or not model.cfg.tie_embeddings:
        return False
    embed = model.embed.weight
    if tuple(lm_head.shape) != tuple(embed.shape):
        raise CheckpointError(f"{path}: tensor {LM_HEAD!r} has shape {tuple(lm_head.shape)}, expected {tuple(embed.shape)}")
    head = lm_head.to(device=embed.device, dtype=embed.dtype)
    if torch.equal(head, embed.detach()):
        return False
    diff = float((head.float() - embed.detach().float()).abs().max())
    warnings.warn(f"{path}: config.json says tie_word_embeddings=true but {LM_HEAD} differs from the embedding (max "
                  f"|difference| {diff:.3g}); using {LM_HEAD} untied, as transformers does", TiedHeadWarning, stacklevel=3)
    model.unembed.weight = nn.Parameter(head, requires_grad=embed.requires_grad)
    model.cfg.tie_embeddings = False
    return True
