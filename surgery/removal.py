"""Layer and sub-layer removal: a smaller working Decoder, renumbered so it equals a model built without those layers.

A pruned model remembers where its blocks came from (`model.layer_origin`: the original index of each block) and which
halves were cut (`cfg.removed_attn` / `cfg.removed_mlp`), so export can describe it and a second removal composes with
the first. The changes themselves are Decoder methods (`keep_blocks`, `remove_sublayers`); this module checks the
user's indices and works on a copy by default.
"""

from __future__ import annotations

import copy as copy_module
from typing import Iterable

from residscope.model.export import removed_sublayers

__all__ = ["check_layers", "layer_origin", "remove_layers", "remove_sublayers", "removed_sublayers"]

from residscope.model.errors import InputError


def layer_origin(model) -> list[int]:
    """Original layer index of each current block (identity for an unpruned model)."""
    return list(model.layer_origin)


def check_layers(layers: Iterable[int], n_layers: int, *, arg: str = "layers") -> list[int]:
    """Layer indices as a list, refusing non-integers, duplicates and indices outside [0, n_layers)."""
    out = []
    for x in layers:
        if isinstance(x, bool) or not isinstance(x, int):
            try:
                if int(x) != x:
                    raise ValueError
                x = int(x)
            except (TypeError, ValueError):
                raise InputError(f"{arg}: layer index {x!r} is not an integer") from None
        if not 0 <= x < n_layers:
            raise InputError(f"{arg}: layer {x} out of range (model has {n_layers} layers, 0..{n_layers - 1})")
        if x in out:
            raise InputError(f"{arg}: layer {x} given twice")
        out.append(x)
    return out


def _copy_model(model):
    """Deep copy of the module; the tokenizer is shared, not copied (it is not changed by surgery)."""
    tokenizer, model.tokenizer = model.tokenizer, None
    try:
        new = copy_module.deepcopy(model)
    finally:
        model.tokenizer = tokenizer
    new.tokenizer = tokenizer
    return new


def remove_layers(model, layers: Iterable[int], *, copy: bool = True):
    """The model without the given blocks (indices in the current numbering): blocks renumbered, `cfg.n_layers` and
    `cfg.layer_types` updated, hook names rebuilt. Each kept attention keeps its run-time positional settings.

    `copy=False` changes `model` in place (no extra memory) and returns it.
    """
    n = len(model.blocks)
    removed = set(check_layers(layers, n))
    if len(removed) == n:
        raise InputError(f"layers: cannot remove all {n} layers")
    if copy:
        model = _copy_model(model)
    model.keep_blocks([i for i in range(n) if i not in removed])
    return model


def remove_sublayers(model, *, attn: Iterable[int] = (), mlp: Iterable[int] = (), copy: bool = True):
    """The model with the attention half of the `attn` blocks and the MLP half of the `mlp` blocks removed: that half
    then adds nothing to the residual stream (ShortGPT's last-layer attention-vs-FFN experiment). Layer count and
    numbering do not change; the norm in front of a removed half stays in the checkpoint but is unused."""
    n = len(model.blocks)
    attn, mlp = check_layers(attn, n, arg="attn"), check_layers(mlp, n, arg="mlp")
    for arg, idx, part in (("attn", attn, "attn"), ("mlp", mlp, "mlp")):
        for i in idx:
            if getattr(model.blocks[i], part) is None:
                raise InputError(f"{arg}: layer {i} has no {part} left to remove")
    if copy:
        model = _copy_model(model)
    model.remove_sublayers(attn=attn, mlp=mlp)
    return model
