"""Data parallelism on torch.distributed: each rank scans every world_size-th batch, float64 sums are all-reduced.

The corpus-level analyses (`block_influence`, `perplexity`, `decompose_positions`, `attention_statistics`, extension and
passkey scoring) take `group`: a process group, or None to use the default one when torch.distributed is initialised
(under `torchrun` or `residscope ... --nproc N`) and to run alone otherwise. Every rank passes the same batches in the
same order and gets the whole result back, so any rank could report it; the CLI lets rank 0 alone print and write.
Sums are float64 and reduced once at the end, so the result equals one process's to rounding (~1e-15 relative).
"""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist

from residscope.common.errors import InputError

T = TypeVar("T")
LOCAL = "local"  # pass as `group` to run alone (every batch, no reduction) even when torch.distributed is initialised


def resolve_group(group=None):
    """`group` itself, the default group when torch.distributed is initialised with more than one rank, else None
    (also for `LOCAL`)."""
    if group == LOCAL:
        return None
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def rank_and_size(group=None) -> tuple[int, int]:
    group = resolve_group(group)
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_main(group=None) -> bool:
    """True on the rank that reports results (rank 0), and in a plain single process."""
    return rank_and_size(group)[0] == 0


def shard(batches: Iterable[T], group=None) -> Iterable[T]:
    """This rank's batches: numbers rank, rank + size, ... (a list stays a list, so progress bars know its length)."""
    rank, size = rank_and_size(group)
    if size == 1:
        return batches
    if isinstance(batches, Sequence):
        return list(batches[rank::size])
    return itertools.islice(batches, rank, None, size)


def _comm_device(group) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of `t` over the ranks (a new float64 tensor on t's device); `t` itself when running alone."""
    group = resolve_group(group)
    if group is None:
        return t
    buf = t.detach().to(_comm_device(group), torch.float64).contiguous().clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(t.device)


def all_reduce_sums(values: Sequence[float], group=None) -> list[float]:
    """Sums over the ranks of a few Python numbers (float64; exact for integer counts below 2**53)."""
    if resolve_group(group) is None:
        return list(values)
    return all_reduce_sum(torch.tensor(list(values), dtype=torch.float64), group).tolist()


def agree(value, group=None, *, what: str):
    """The one value all ranks that have one hold (None where a rank saw no batch); ValueError when ranks differ."""
    group = resolve_group(group)
    if group is None:
        return value
    seen = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, value, group=group)
    distinct = {v for v in seen if v is not None}
    if len(distinct) > 1:
        raise InputError(f"{what} differs between ranks: {sorted(distinct)}")
    return distinct.pop() if distinct else None


def gather_items(items: dict, group=None) -> dict:
    """The union over ranks of small per-item results (e.g. decoded answers), every rank getting all of them."""
    group = resolve_group(group)
    if group is None:
        return dict(items)
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, items, group=group)
    return {k: v for part in parts for k, v in part.items()}
