"""Tensor names: Hugging Face checkpoint keys <-> residscope parameter names, in both directions.

Each family's `WeightMap` (model/families/) says where its tensors lie; loading, offloaded streaming and export all go
through the functions here, so a model exported after surgery uses exactly the names (and fusions) it was loaded with.
"""

from __future__ import annotations

import torch

from .config import DecoderConfig
from .families import Packed, WeightMap, family_of, local_parts


def weight_map(cfg: DecoderConfig) -> WeightMap:
    return family_of(cfg.model_type).weights(cfg)


def local_names(key: str, cfg: DecoderConfig) -> list[str]:
    """Local parameter names for one checkpoint key: [] for ignorable buffers, several when the checkpoint fuses
    tensors (split in `Packed.parts` order). KeyError for unknown keys."""
    found = weight_map(cfg).rule(key)
    return [] if found is None else local_parts(*found)


def needs_split(key: str, cfg: DecoderConfig) -> bool:
    """True when the checkpoint tensor must be read whole and transformed (fused or transposed), not copied as is."""
    found = weight_map(cfg).rule(key)
    return found is not None and isinstance(found[1], Packed)


def split_tensor(key: str, tensor: torch.Tensor, cfg: DecoderConfig, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """The values of the parameters `local_names(key)` (whose shapes are `shapes`) from one checkpoint tensor."""
    found = weight_map(cfg).rule(key)
    rule = found[1] if found is not None else None
    if not isinstance(rule, Packed):
        return [tensor]
    return rule.split(tensor, shapes, cfg.n_heads)


def hf_to_local(key: str, tensor: torch.Tensor, cfg: DecoderConfig,
                shapes: list[torch.Size] | None = None) -> list[tuple[str, torch.Tensor]]:
    """Local (name, tensor) pairs for one checkpoint tensor (fused tensors split by the parameters' `shapes`; without
    them, into equal row blocks)."""
    names = local_names(key, cfg)
    if len(names) == 1 and not needs_split(key, cfg):
        return [(names[0], tensor)]
    if shapes is None:
        rows = tensor.shape[0] // len(names)
        shapes = [torch.Size([rows, *tensor.shape[1:]])] * len(names)
    return list(zip(names, split_tensor(key, tensor, cfg, shapes)))


def export_rules(wmap: WeightMap, n_layers: int):
    """(checkpoint key, layer or None, rule) in the order export writes them: the top-level keys, then each block's
    with fused rules first (Baichuan's W_pack before the q/k/v_proj it covers); load-only alternatives (fused experts)
    left out."""
    for key, rule in wmap.top.items():
        if not getattr(rule, "load_only", False):
            yield key, None, rule
    fused_first = sorted(wmap.block.items(), key=lambda item: not isinstance(item[1], Packed))
    for layer in range(n_layers):
        for suffix, rule in fused_first:
            if not getattr(rule, "load_only", False):
                yield wmap.layer_key(layer, suffix), layer, rule


def hf_key_for(name: str, cfg: DecoderConfig) -> str | None:
    """The checkpoint key that holds residscope parameter `name` (a fused key when several parameters share it), as
    export writes it; None when no rule names it. For error messages: a missing tensor is named as the file names it."""
    return next((key for key, layer, rule in export_rules(weight_map(cfg), cfg.n_layers)
                 if name in local_parts(layer, rule)), None)


def local_to_hf(state: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Hugging Face state dict from a residscope state dict (fused tensors fused back). A tied unembedding is left out,
    as transformers expects; a rule whose parameters are all absent (a removed half, an absent bias) writes nothing."""
    wmap = weight_map(cfg)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def emit(key: str, layer: int | None, rule) -> None:
        names = local_parts(layer, rule)
        if used.intersection(names):
            return  # already written by a fused rule (Baichuan's W_pack over q/k/v_proj)
        present = [n for n in names if n in state]
        if not present:
            return
        if len(present) != len(names):
            raise KeyError(f"{key}: parameters {sorted(set(names) - set(present))} are missing to fuse it")
        used.update(names)
        if isinstance(rule, Packed):
            out[key] = rule.merge([state[n] for n in names], cfg.n_heads)
        else:
            out[key] = state[names[0]]

    for key, layer, rule in export_rules(wmap, cfg.n_layers):
        if layer is None and rule == "unembed.weight" and cfg.tie_embeddings:
            used.add("unembed.weight")
            continue
        emit(key, layer, rule)
    unmapped = [n for n in state if n not in used]
    if unmapped:
        raise KeyError(f"no Hugging Face name for parameter {unmapped[0]!r}")
    return out

