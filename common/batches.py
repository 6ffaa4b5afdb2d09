"""Token batches as the streaming passes take them (perplexity, Block Influence): ids [batch, pos], or (ids, mask)."""

from __future__ import annotations

import torch

from .errors import InputError

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]


def unpack_batch(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch is token ids [batch, pos], or (ids, attention_mask) with mask [batch, pos] (1 = token, 0 = padding)."""
    if isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        ids, mask = batch
    else:
        raise InputError(f"a batch must be token ids [batch, pos] or (ids, attention_mask), got {type(batch).__name__}")
    if ids.dim() != 2:
        raise InputError(f"token ids must be [batch, pos], got shape {tuple(ids.shape)}")
    if mask is not None and mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {tuple(mask.shape)}, token ids {tuple(ids.shape)}")
    return ids, mask


def batch_count(batches) -> int | None:
    """len(batches) for a progress bar, or None for a generator."""
    try:
        return len(batches)
    except TypeError:
        return None
