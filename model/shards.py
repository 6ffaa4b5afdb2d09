"""The one reader of a checkpoint's file list: `model.safetensors.index.json` and the safetensors headers it points
to, checked against each other before any weight is read, so a checkpoint that lies fails in one line naming the file
and the tensor instead of loading something else than it says:

    index       a JSON object whose weight_map maps tensor names (strings) to shard file names (strings, in this
                folder), each name listed once; every listed shard exists
    headers     each file's byte ranges are valid (`safetensors_io.read_header`: inside the file, no overlap, no gap)
    together    no tensor in two shard files; each tensor lies in the file the index names, and the index lists every
                tensor the files hold

`FileStamp` is a file's identity (device, inode, size, mtime, header hash) at the time its header was read: the
block-streamed reader (`offload.py`) checks it before each read, since it reads at offsets taken at load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import CheckpointError
from .safetensors_io import Entry, read_header

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _no_duplicate_keys(what: Path):
    def hook(pairs: list[tuple[str, object]]) -> dict:
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                raise CheckpointError(f"{what}: key {key!r} appears twice ({seen[key]!r} and {value!r})")
            seen[key] = value
        return seen

    return hook


def read_index(index: Path) -> dict[str, str]:
    """The validated weight_map of a shard index: {tensor name: shard file name}."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys(index))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    if not isinstance(data, dict) or "weight_map" not in data:
        raise CheckpointError(f"{index}: not a valid safetensors index (no 'weight_map' object)")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: weight_map must be a non-empty object {{tensor name: shard file}}, got a "
                              f"{type(weight_map).__name__}" + (" (empty)" if weight_map == {} else ""))
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{index}: weight_map[{name!r}] must be a shard file name in this folder, got {shard!r}")
    return weight_map


def weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """The checkpoint's weight files, checked (see the module docstring): sharded safetensors, one safetensors file,
    or pickled *.bin files when `allow_pickle` (refused otherwise: unpickling can run code)."""
    index = folder / INDEX
    if index.is_file():
        weight_map = read_index(index)
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
        check_shards(files, weight_map, index)
        return files
    single = folder / SINGLE
    if single.is_file():
        check_shards([single])
        return [single]
    pickles = sorted(folder.glob("*.bin"))
    if pickles:
        if not allow_pickle:
            raise CheckpointError(f"{pickles[0]}: pickled checkpoint refused (it can run code); pass allow_pickle=True to load it")
        return pickles
    raise CheckpointError(f"{folder}: no {SINGLE}, {INDEX} or *.bin weights")


def check_shards(files: list[Path], weight_map: dict[str, str] | None = None, index: Path | None = None) -> None:
    """Every file's header is valid, no tensor is in two files, and (with an index) the files hold exactly what the
    index says where it says it. Reads headers only."""
    where: dict[str, Path] = {}
    for path in files:
        try:
            with open(path, "rb") as f:
                entries = read_header(f, path)
        except PermissionError as e:
            raise CheckpointError(f"{e.filename or path}: permission denied") from None
        for entry in entries:
            if entry.name in where:
                raise CheckpointError(f"{path}: tensor {entry.name!r} is also in {where[entry.name].name} (a tensor "
                                      "must be in one shard only)")
            where[entry.name] = path
    if weight_map is None:
        return
    for name, path in where.items():
        listed = weight_map.get(name)
        if listed is None:
            raise CheckpointError(f"{path}: tensor {name!r} is not listed in {index.name}")
        if listed != path.name:
            raise CheckpointError(f"{index}: weight_map puts {name!r} in {listed}, but it is in {path.name}")
    for name, shard in weight_map.items():
        if name not in where:
            raise CheckpointError(f"{index}: tensor {name!r} is listed in {shard}, which does not hold it")


# ---- file identity --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileStamp:
    """What identifies the bytes of a file we read at offsets taken earlier: a rewrite (even of the same size, even
    through the same inode) changes the mtime; a replacement by rename changes the inode; a new layout changes the
    header."""

    path: Path
    device: int
    inode: int
    size: int
    mtime_ns: int
    header_sha256: str

    @classmethod
    def of_open(cls, f: BinaryIO, path: Path) -> "FileStamp":
        st = os.fstat(f.fileno())
        return cls(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, _header_hash(f))

    def check(self, f: BinaryIO) -> None:
        """CheckpointError in one line when the open file `f` is not the file this stamp was taken of."""
        st = os.fstat(f.fileno())
        now = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if now != (self.device, self.inode, self.size, self.mtime_ns) or _header_hash(f) != self.header_sha256:
            raise CheckpointError(f"{self.path}: the file changed since the model was loaded (size, time, inode or "
                                  "header differ); its tensors' offsets are stale: load the model again")


def _header_hash(f: BinaryIO) -> str:
    """sha256 of the length prefix and JSON header (the offsets we trust). Leaves the file position where it was."""
    pos = f.tell()
    try:
        f.seek(0)
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else 0
        return hashlib.sha256(raw + f.read(min(n, 100 * 2**20))).hexdigest()
    finally:
        f.seek(pos)


__all__ = ["Entry", "FileStamp", "INDEX", "check_shards", "read_index", "weight_files"]
