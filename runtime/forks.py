"""Forked forwards: many variants of one model, each missing one part, run without repeating what they share.

A pruning criterion that scores "the model without block j" for every j (one-shot perplexity, SLEB's greedy step,
BlockPruner's sub-block search) would naively run one full forward per candidate. But the variant without block j
equals the model up to block j: its stream *forks* from the shared one there. `forked_forward` runs the blocks once,
layer-major:

    base stream x_0 -> block 0 -> x_1 -> ... -> block k -> ...
    at block k:  every fork that started earlier runs block k whole;
                 a fork (k, "block") starts as x_k (block k skipped);
                 a fork (k, "attn") / (k, "mlp") starts as block k run with that half's output zeroed (the half removed:
                 `hook_attn_out` / `hook_mlp_out` return 0, so the stream is x + 0, exactly the removed model's);
                 the base stream runs block k whole (skipped once no fork starts later and the base is not wanted)

so the fork at block k costs L - k block runs instead of L (about half the blocks of all forks together), and every
block is touched once per batch group. `removed` applies to the base and every fork alike: the current model of a
greedy search (SLEB, BlockPruner) is "the model with `removed` gone", with no copy of the weights.

In memory each batch runs on its own (memory: one batch's stream per live fork). An offloaded model (`--offload`,
`residscope.model.offload`) runs all of this rank's batches through each block while it is read from disk once
(memory: every batch's stream per live fork). Batches are sharded over torch.distributed ranks (`distributed.shard`);
the caller reduces whatever it sums from the outputs.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from residscope.common.batches import Batch, unpack_batch
from residscope.common.errors import InputError

from .distributed import is_main, shard

PARTS = ("block", "attn", "mlp")


@dataclass(frozen=True)
class Fork:
    """A variant of the model: block `layer` (current numbering) without `part` ("block": the whole block skipped;
    "attn" / "mlp": that half removed)."""

    layer: int
    part: str = "block"


@dataclass
class ForkOutput:
    fork: int  # index into `forks`, or -1 for the base model (the model with only `removed` gone)
    index: int  # position among this rank's batches
    ids: torch.Tensor  # [batch, pos]
    mask: torch.Tensor | None  # [batch, pos] or None
    logits: torch.Tensor  # [batch, pos, vocab]


def check_forks(model, forks: Sequence[Fork], removed: Sequence[Fork]) -> None:
    n = len(model.blocks)
    gone = set(removed)
    for f in [*forks, *removed]:
        if f.part not in PARTS:
            raise InputError(f"fork part must be one of {', '.join(PARTS)}; got {f.part!r}")
        if not 0 <= f.layer < n:
            raise InputError(f"fork layer {f.layer} out of range (model has {n} layers)")
        if f.part != "block" and getattr(model.blocks[f.layer], f.part) is None:
            raise InputError(f"fork: layer {f.layer} has no {f.part} to remove")
    for f in forks:
        if f in gone or Fork(f.layer) in gone:
            raise InputError(f"fork {f} is already removed")


def forked_forward(model, batches: Iterable[Batch], forks: Sequence[Fork], *, removed: Sequence[Fork] = (),
                   base: bool = False, group=None, progress: bool = True, desc: str = "forks") -> Iterator[ForkOutput]:
    """Logits of every fork (and of the base model when `base`) on this rank's batches, under inference mode.

    Yields one ForkOutput per (fork, batch): in memory batch by batch, offloaded after every block has run."""
    forks, removed = list(forks), list(removed)
    check_forks(model, forks, removed)
    mine = list(shard(batches, group))
    show = progress and is_main(group)
    with torch.inference_mode():
        prepared = [_prepare(model, i, b) for i, b in enumerate(mine)]
        if model.offload is not None:
            groups = [prepared] if prepared else []
        else:
            groups = [[p] for p in prepared]
        for chunk in tqdm(groups, desc=desc, disable=not show or len(groups) < 2, leave=False):
            yield from _run_group(model, chunk, forks, removed, base, progress=show and len(groups) == 1, desc=desc)


@dataclass
class _Input:
    index: int
    ids: torch.Tensor
    mask: torch.Tensor | None
    pos: object  # the decoder's per-forward position state (RoPE positions, padding)
    x0: torch.Tensor  # [batch, pos, d_model] the stream entering block 0


def _prepare(model, index: int, batch: Batch) -> _Input:
    ids, mask = unpack_batch(batch)
    ids = ids.to(model.device)
    mask = mask.to(model.device) if mask is not None else None
    # what Decoder.forward does before its first block (ids checked, left padding masked), as model.offload does
    ids, mask = model._input_ids(ids, mask, None, None, 0)
    pos = model._positions(ids.shape, ids.device, mask, None, None)
    x0 = model(ids, attention_mask=mask, stop_at_layer=0)  # [batch, pos, d_model]: embedding (and hook_embed)
    return _Input(index, ids, mask, pos, x0)


@contextlib.contextmanager
def _blocks(model, progress: bool, desc: str):
    """(index, block) over the current blocks: in memory, or read from disk one at a time when offloaded."""
    if model.offload is None:
        yield enumerate(model.blocks)
        return
    from residscope.model.offload import streamed_blocks

    with contextlib.closing(streamed_blocks(model, None, None, progress=progress, desc=desc)) as blocks:
        yield enumerate(blocks)


def _zero(x, hook):
    return torch.zeros_like(x)


def _run(model, block, layer: int, x: torch.Tensor, pos, without: Sequence[str]) -> torch.Tensor:
    """Block `layer` on stream x, with the halves in `without` ("attn", "mlp") contributing nothing."""
    if not without:
        return block(x, pos)
    with model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_{part}_out", _zero) for part in without]):
        return block(x, pos)


def _run_group(model, inputs: list[_Input], forks: list[Fork], removed: list[Fork], base: bool, *, progress: bool,
               desc: str) -> Iterator[ForkOutput]:
    skipped = {f.layer for f in removed if f.part == "block"}
    halves = defaultdict(list)  # layer -> halves removed from the current model
    for f in removed:
        if f.part != "block":
            halves[f.layer].append(f.part)
    starts = defaultdict(list)  # layer -> forks starting there
    for i, f in enumerate(forks):
        starts[f.layer].append(i)
    last_start = max(starts, default=-1)
    streams = [x.x0 for x in inputs]  # base stream per batch
    branch: dict[int, list[torch.Tensor]] = {}  # fork -> its stream per batch
    with _blocks(model, progress, desc) as blocks:
        for k, block in blocks:
            if k in skipped:
                continue
            for i, xs in branch.items():  # forks that started below k run block k as the current model has it
                branch[i] = [_run(model, block, k, x, inp.pos, halves[k]) for x, inp in zip(xs, inputs)]
            for i in starts[k]:
                part = forks[i].part
                if part == "block":
                    branch[i] = list(streams)
                else:
                    branch[i] = [_run(model, block, k, x, inp.pos, [*halves[k], part]) for x, inp in zip(streams, inputs)]
            if base or k < last_start:
                streams = [_run(model, block, k, x, inp.pos, halves[k]) for x, inp in zip(streams, inputs)]
    finals = [(i, branch[i]) for i in range(len(forks))] + ([(-1, streams)] if base else [])
    for i, xs in finals:
        for x, inp in zip(xs, inputs):
            logits = model.unembed_residual(model.ln_final(x))  # [batch, pos, vocab]
            yield ForkOutput(i, inp.index, inp.ids, inp.mask, logits)
