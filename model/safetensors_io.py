"""Read safetensors files tensor by tensor with plain file reads, straight into existing parameters.

The safetensors library memory-maps the file, so every page it reads stays counted in the process's memory until the
file is closed: loading a model that way peaks near twice its size. The format is a little-endian u64 header length,
a JSON header {name: {dtype, shape, data_offsets}}, then raw little-endian bytes; reading those bytes with `readinto`
into the parameter itself keeps the peak at the model's size plus (for dtype conversions) one tensor.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import torch

from .errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(f: BinaryIO, path: Path) -> list[Entry]:
    """The tensors of an open safetensors file, validated against the file size; errors name the file and key."""
    size = path.stat().st_size
    raw = f.read(8)
    if len(raw) != 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (header_len,) = struct.unpack("<Q", raw)
    if header_len > min(_MAX_HEADER, size - 8):
        raise CheckpointError(f"{path}: not a safetensors file (header length {header_len} exceeds the file)")
    try:
        header = json.loads(f.read(header_len), object_pairs_hook=_unique_names(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        numel = 1
        for d in shape:
            if d < 0:
                raise CheckpointError(f"{path}: tensor {name!r} has a negative dimension in shape {shape}")
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or end + data_start > size or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} data is truncated or inconsistent with its shape {shape}")
        entries.append(Entry(name, dtype, shape, data_start + begin, nbytes))
    entries.sort(key=lambda e: (e.start, e.nbytes))  # sequential reads
    _check_layout(entries, data_start, size, path)
    return entries


def _unique_names(path: Path):
    def hook(pairs):
        names = [k for k, _ in pairs]
        if len(set(names)) != len(names):
            dup = next(k for k in names if names.count(k) > 1)
            raise CheckpointError(f"{path}: tensor {dup!r} appears twice in the safetensors header")
        return dict(pairs)

    return hook


def _check_layout(entries: list[Entry], data_start: int, size: int, path: Path) -> None:
    """What the safetensors library refuses: tensors' byte ranges must tile the data section exactly, in order, with
    no overlap (two tensors would share bytes), no gap and nothing after the last one."""
    end = data_start
    for e in entries:
        if e.start < end:
            raise CheckpointError(f"{path}: tensor {e.name!r} overlaps the bytes of another tensor (invalid data_offsets)")
        if e.start > end:
            raise CheckpointError(f"{path}: {e.start - end} bytes before tensor {e.name!r} belong to no tensor "
                                  "(invalid data_offsets)")
        end = e.start + e.nbytes
    if end != size:
        raise CheckpointError(f"{path}: {size - end} bytes after the last tensor belong to no tensor (the file is not "
                              "what its header describes)")


def _fill(f: BinaryIO, entry: Entry, target: torch.Tensor, path: Path) -> None:
    f.seek(entry.start)
    view = target.detach().view(torch.uint8).reshape(-1).numpy()  # the target's own bytes
    if f.readinto(view) != entry.nbytes:
        raise CheckpointError(f"{path}: tensor {entry.name!r} is truncated")


def read_tensor(f: BinaryIO, entry: Entry, path: Path) -> torch.Tensor:
    """A fresh CPU tensor holding one entry."""
    out = torch.empty(entry.shape, dtype=entry.dtype)
    _fill(f, entry, out, path)
    return out


def read_into(f: BinaryIO, entry: Entry, target: torch.Tensor, path: Path) -> None:
    """Copy one entry into `target` (any dtype/device): directly into its memory when it is a contiguous CPU tensor
    of the same dtype, else through one temporary tensor."""
    if tuple(target.shape) != entry.shape:
        raise CheckpointError(f"{path}: tensor {entry.name!r} has shape {entry.shape}, expected {tuple(target.shape)}")
    if target.device.type == "cpu" and target.dtype == entry.dtype and target.is_contiguous():
        _fill(f, entry, target, path)
    else:
        with torch.no_grad():
            target.copy_(read_tensor(f, entry, path))


def iter_entries(path: Path) -> Iterator[tuple[BinaryIO, Entry]]:
    with open(path, "rb") as f:
        for entry in read_header(f, path):
            yield f, entry
