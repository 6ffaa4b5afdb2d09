"""Export of a block-streamed (offload=True) model without holding it: the kept layers' tensors are copied from the
source safetensors files, renumbered, shard by shard, one tensor in memory at a time.

The safetensors library writes a file from a dict of tensors that are all in memory at once, which is what this avoids;
the format is simple enough to stream: a little-endian u64 header length, a JSON header
{name: {dtype, shape, data_offsets}} padded with spaces to 8 bytes, then each tensor's raw little-endian bytes.
Tensors are converted to the model's dtype, so the result equals `save_pretrained` of the same model held in memory.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .checkpoint import local_names, weight_map
from .safetensors_io import DTYPES, read_header, read_tensor

_SAFETENSORS_DTYPE = {v: k for k, v in DTYPES.items()}


def renamed_key(key: str, new_index: dict[int, int], model) -> str | None:
    """The key in the pruned checkpoint (layer renumbered), or None when the tensor is not exported."""
    names = local_names(key, model.cfg)
    if not names or (names == ["unembed.weight"] and model.cfg.tie_embeddings):
        return None  # ignorable buffers; a tied unembedding is the embedding
    wmap = weight_map(model.cfg)
    found = wmap.layer_of(key)
    if found is None:
        return key
    layer, suffix = found
    if layer not in new_index:
        return None
    return wmap.layer_key(new_index[layer], suffix)


def write_kept_tensors(model, folder: Path) -> list[Path]:
    """Write the kept tensors of `model` (offloaded; `layer_origin` says which original layers it keeps) into
    `folder`: one output shard per source shard that holds any, plus model.safetensors.index.json when several."""
    store = model.offload
    new_index = {orig: i for i, orig in enumerate(model.layer_origin)}
    plans = []
    for path in store.files:
        with store.open_checked(path) as f:  # the file the model was loaded from, unchanged
            entries = [(e, renamed_key(e.name, new_index, model)) for e in read_header(f, path)]
        entries = [(e, k) for e, k in entries if k is not None]
        if entries:
            plans.append((path, entries))
    names = (["model.safetensors"] if len(plans) == 1 else
             [f"model-{i + 1:05d}-of-{len(plans):05d}.safetensors" for i in range(len(plans))])
    weight_map, written = {}, []
    for (path, entries), name in zip(plans, names):
        _write_shard(store, path, entries, folder / name, model.dtype)
        weight_map.update({key: name for _, key in entries})
        written.append(folder / name)
    if len(plans) > 1:
        index = {"metadata": {"total_size": sum(p.stat().st_size for p in written)}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return written


def _write_shard(store, source: Path, entries: list, target: Path, dtype: torch.dtype) -> None:
    item = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for entry, key in entries:
        nbytes = item * (entry.nbytes // torch.empty((), dtype=entry.dtype).element_size())
        header[key] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(entry.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with store.open_checked(source) as src, open(target, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for entry, _ in entries:  # one tensor in memory at a time
            tensor = read_tensor(src, entry, source).to(dtype).contiguous()
            out.write(tensor.reshape(-1).view(torch.uint8).numpy())
        store.check_file(source, src)  # unchanged while we copied
