"""Layers across devices: `load_model(..., device_map="auto" | {"blocks.0-15": "cuda:0", "blocks.16-31": "cuda:1"})`.

Contiguous runs of blocks live on one device each; the embedding goes with the first block and the final norm and
unembedding with the last (a tied embedding, being the unembedding, goes with the last block and its lookups move).
Forward pre-hooks move the residual stream and the per-forward position state to a block's device at the boundaries,
so `Decoder.forward`, hooks, `run_with_cache` and the KV cache (kept per attention module, on its device) work as on
one device; logits come out on the last block's device.

`plan_device_map` is the pure part: layer sizes and device capacities in, one device per block out.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Sequence

import torch

from residscope.common.errors import InputError

from .decoder import Positions

_RANGE = re.compile(r"^blocks\.(\d+)(?:-(\d+))?$")


def plan_device_map(layer_bytes: Sequence[int], capacities: Mapping[str, int], *, embed_bytes: int = 0,
                    unembed_bytes: int = 0) -> list[str]:
    """One device per block: blocks fill the devices in the order given, each device taking consecutive blocks while
    they fit in its capacity (bytes); the first device also holds the embedding, the last used one the unembedding.
    ValueError when the model does not fit."""
    devices = list(capacities)
    if not devices:
        raise InputError("device_map: no devices to place the model on")
    plan, d, used = [], 0, embed_bytes
    for i, size in enumerate(layer_bytes):
        need = size + (unembed_bytes if i == len(layer_bytes) - 1 else 0)
        while used + need > capacities[devices[d]]:  # this device is full: go on with the next one
            d, used = d + 1, 0
            if d == len(devices):
                raise InputError(f"device_map: the model does not fit in {dict(capacities)} bytes (block {i} of "
                                 f"{len(layer_bytes)} did not)")
        plan.append(devices[d])
        used += size
    return plan


def parse_device_map(spec: Mapping[str, str], n_layers: int) -> list[str]:
    """{"blocks.0-15": "cuda:0", "blocks.16": "cpu", ...} -> one device per block; every block placed exactly once."""
    plan: list[str | None] = [None] * n_layers
    for key, device in spec.items():
        m = _RANGE.match(str(key))
        if m is None:
            raise InputError(f"device_map: key {key!r} is not 'blocks.I' or 'blocks.I-J'")
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if not 0 <= lo <= hi < n_layers:
            raise InputError(f"device_map: {key!r} is outside blocks 0..{n_layers - 1}")
        for i in range(lo, hi + 1):
            if plan[i] is not None:
                raise InputError(f"device_map: block {i} is placed twice ({plan[i]!r} and {device!r})")
            plan[i] = str(device)
    missing = [i for i, d in enumerate(plan) if d is None]
    if missing:
        raise InputError(f"device_map: block {missing[0]} is not placed" + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for device in dict.fromkeys(plan):
        check_device(device)
    return plan  # type: ignore[return-value]


def check_device(device: str) -> torch.device:
    """The device, or a one-line ValueError naming it when this machine has no such device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device_map: {device!r} is not a device name") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"device_map: device {device!r} is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device_map: device {device!r} is not available on this machine")
    return dev


def free_memory() -> dict[str, int]:
    """Free bytes per CUDA device, in index order; the CPU (available RAM) when there is none."""
    if torch.cuda.is_available():
        return {f"cuda:{i}": torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
    return {"cpu": _available_ram()}


def _available_ram() -> int:
    """MemAvailable of /proc/meminfo (Linux), else the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_device_map(device_map, model, dtype: torch.dtype) -> list[str]:
    """One device per block for "auto" (by free memory) or an explicit mapping."""
    n = len(model.blocks)
    if device_map == "auto":
        item = torch.empty((), dtype=dtype).element_size()
        layer_bytes = [sum(p.numel() for p in b.parameters()) * item for b in model.blocks]
        return plan_device_map(layer_bytes, free_memory(), embed_bytes=model.embed.weight.numel() * item,
                               unembed_bytes=model.unembed.weight.numel() * item)
    if isinstance(device_map, Mapping):
        return parse_device_map(device_map, n)
    raise InputError(f"device_map: expected 'auto' or a mapping like {{'blocks.0-15': 'cuda:0'}}, got {device_map!r}")


# ---------------------------------------------------------------------------------------------------------------------
# placing a model built on `meta`
# ---------------------------------------------------------------------------------------------------------------------
def place(model, plan: Sequence[str]) -> None:
    """Materialise (to_empty) every module of a `meta` model on its planned device and add the boundary hooks."""
    first, last = torch.device(plan[0]), torch.device(plan[-1])
    for block, device in zip(model.blocks, plan):
        block.to_empty(device=device)
        block.register_forward_pre_hook(_MoveInputs(torch.device(device)))
    model.ln_final.to_empty(device=last)
    model.unembed.to_empty(device=last)
    embed_device = last if model.cfg.tie_embeddings else first  # tied: the unembedding's matrix, used last
    model.embed.to_empty(device=embed_device)
    model.embed.register_forward_pre_hook(_MoveInputs(embed_device))
    model.tie_weights()
    model.device_plan = list(plan)


def _positions_on(pos, device: torch.device):
    """The per-forward position state on `device` (built once per device and forward)."""
    if pos.positions.device == device:
        return pos
    copies = pos.__dict__.setdefault("_on_device", {})
    if device not in copies:
        copies[device] = type(pos)(positions=pos.positions.to(device),
                                   key_valid=pos.key_valid.to(device) if pos.key_valid is not None else None,
                                   past=pos.past)
    return copies[device]


class _MoveInputs:
    """Forward pre-hook: a module's tensor inputs (and Positions) to its device."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, module, args):
        return tuple(_positions_on(a, self.device) if isinstance(a, Positions)
                     else a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args)
