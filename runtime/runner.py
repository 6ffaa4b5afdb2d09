"""The one way corpus-level analyses push batches through a model: `forward_batches`.

It shards the batches over torch.distributed ranks (see `distributed.py`), moves them to the model's device, attaches the
caller's hooks and yields each batch's output. How the forward runs depends on the model:

    in memory        batch-major: each batch goes through the whole model, as `model(ids, mask)` does
    offload=True     layer-major (`residscope.model.offload`): every batch goes through block i, then block i+1 is read
                     from disk; hooks fire under the same names with the same per-batch tensors

so an analysis written against `forward_batches` runs streamed without knowing it. Hooks may depend on the batch
(e.g. its padding mask): pass `hooks` as a function (index, ids, mask) -> [(name, fn), ...]; it is called for each batch
(in layer-major order: once per block and batch), so per-batch state must be keyed by `index`, not by "the current batch".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, Union

import torch
from tqdm.auto import tqdm

from .distributed import is_main, shard
from residscope.common.batches import Batch, batch_count, unpack_batch

Hooks = Sequence[tuple[str, Callable]]
HookFactory = Callable[[int, torch.Tensor, Union[torch.Tensor, None]], Hooks]


@dataclass
class BatchOutput:
    index: int  # position among this rank's batches
    ids: torch.Tensor  # [batch, pos] on the model's device
    mask: torch.Tensor | None  # [batch, pos] or None (no padding)
    output: torch.Tensor  # logits [batch, pos, vocab], or the residual stream entering block stop_at_layer


def hooks_of(hooks: Hooks | HookFactory, index: int, ids: torch.Tensor, mask: torch.Tensor | None) -> list:
    return list(hooks(index, ids, mask)) if callable(hooks) else list(hooks)


def forward_batches(model, batches: Iterable[Batch], *, hooks: Hooks | HookFactory = (), stop_at_layer: int | None = None,
                    group=None, progress: bool = True, desc: str = "batches") -> Iterator[BatchOutput]:
    """Yield this rank's batches with the model's output for each, under `torch.inference_mode`.

    stop_at_layer=L yields the residual stream entering block L (L = n_layers: after the last block, before the final
    norm), skipping the unembedding; None yields logits.
    """
    mine = shard(batches, group)
    bar = dict(total=batch_count(mine), desc=desc, disable=not progress or not is_main(group), leave=False)
    with torch.inference_mode():
        if model.offload is not None:
            from residscope.model.offload import streamed_forward

            inputs = [_to_device(model, b) for b in mine]  # layer-major: every batch is needed at every block
            outputs = streamed_forward(model, inputs, hooks=lambda i: hooks_of(hooks, i, *inputs[i]),
                                       stop_at_layer=stop_at_layer, progress=not bar["disable"], desc=desc)
            for index, ((ids, mask), out) in enumerate(zip(inputs, outputs)):
                yield BatchOutput(index, ids, mask, out)
            return
        for index, batch in enumerate(tqdm(mine, **bar)):
            ids, mask = _to_device(model, batch)
            with model.hooks(fwd_hooks=hooks_of(hooks, index, ids, mask)):
                out = model(ids, attention_mask=mask, stop_at_layer=stop_at_layer)
            yield BatchOutput(index, ids, mask, out)


def _to_device(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids, mask = unpack_batch(batch)
    return ids.to(model.device), (mask.to(model.device) if mask is not None else None)
