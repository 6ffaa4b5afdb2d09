"""Block-streamed execution for models larger than RAM or VRAM: `load_model(source, offload=True)`.

The embeddings, final norm and unembedding are loaded; every block stays on disk (its parameters live on the `meta`
device) and `BlockStore` remembers where each of its tensors lies in the safetensors files. `streamed_forward` then runs
a list of batches layer-major:

    embed every batch  ->  for each block: read it (plain file reads, as load_model does), run every batch through it
                           under the caller's hooks, free it  ->  final norm and unembedding per batch

Block i+1 is read by a background thread while block i computes, so the time is about max(read, compute) and at most two
blocks are in memory. Hook names and the tensors they see are those of the in-memory forward (same modules, same
`Positions`), which is why analyses need no streamed variant: they call `runtime.runner.forward_batches`. Activations of
all batches stay on the compute device, or in CPU memory with `model.offload.activations = "cpu"`.

Offsets taken at load are only true of the file they were taken from: every streamed read first checks the file's
identity (`shards.FileStamp`: device, inode, size, mtime, header hash) and stops in one line naming the file when it
changed (re-saved, replaced), rather than read other bytes as weights.

A plain call (`model(ids)`, `run_with_cache`, `generate`) on an offloaded model streams too, one batch through
`streamed_blocks`: slower (every call reads every block), but the whole TransformerLens surface works.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .checkpoint import local_names, needs_split, split_tensor
from .config import DecoderConfig
from .decoder import Decoder
from .errors import CheckpointError, InputError
from .safetensors_io import Entry, read_header, read_into, read_tensor
from .shards import FileStamp


@dataclass(frozen=True)
class TensorRef:
    """Where one local parameter lies: an entry of a safetensors file, or part `part` of a fused or transposed one
    whose parts are the block's parameters `siblings` (split by `checkpoint.split_tensor`)."""

    path: Path
    entry: Entry
    part: int = 0
    siblings: tuple[str, ...] = ()  # non-empty: the tensor must be read whole and split

    @property
    def parts(self) -> int:
        return max(1, len(self.siblings))


@dataclass
class StreamStats:
    """What streaming cost, summed over forwards (the benchmark reports these)."""

    read_seconds: float = 0.0  # in the reader thread
    read_bytes: int = 0
    compute_seconds: float = 0.0  # running batches through materialised blocks
    wait_seconds: float = 0.0  # compute thread waiting for a block that was not read yet


@dataclass
class BlockStore:
    """The on-disk tensors of every original layer: layer -> {name inside the block: TensorRef}."""

    layers: dict[int, dict[str, TensorRef]]
    files: list[Path]  # the checkpoint's safetensors files (streamed export copies from them)
    device: torch.device
    dtype: torch.dtype
    activations: str = "device"  # or "cpu": keep all batches' residual streams in CPU memory between blocks
    allow_nonfinite: bool = False  # else a streamed tensor holding NaN / Inf stops the forward with one line
    streaming: bool = False  # a forward is running through the blocks (calls cannot nest)
    stamps: dict = field(default_factory=dict)  # path -> shards.FileStamp taken when the offsets were read
    stats: StreamStats = field(default_factory=StreamStats)
    cfg: DecoderConfig | None = None  # how fused tensors split (the family's weight map)
    _free: dict = field(default_factory=dict, repr=False)  # shape -> tensors of released blocks, reused by reads
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __deepcopy__(self, memo) -> "BlockStore":
        return self  # a copied model (remove_layers copies) reads the same files: it shares the store and its buffers

    def read_block(self, layer: int, names: Sequence[str], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        """The named tensors of one original layer, on the compute device in the compute dtype."""
        start = time.perf_counter()
        out, files = {}, {}
        try:
            for name in names:
                ref = self.layers.get(layer, {}).get(name)
                if ref is None:
                    raise CheckpointError(f"layer {layer}: no tensor for blocks.{layer}.{name} in the checkpoint")
                f = files.get(ref.path) or files.setdefault(ref.path, self.open_checked(ref.path))
                out[name] = self._read(f, ref, shapes[name], shapes)
                self.stats.read_bytes += ref.entry.nbytes // ref.parts
            for path, f in files.items():  # a rewrite while we read: the bytes may be a mix of old and new
                self.check_file(path, f)
        finally:
            for f in files.values():
                f.close()
        self.stats.read_seconds += time.perf_counter() - start
        return out

    def open_checked(self, path: Path):
        """`path` opened for reading, after checking it is the file whose offsets were taken at load."""
        f = open(path, "rb")
        try:
            self.check_file(path, f)
        except BaseException:
            f.close()
            raise
        return f

    def check_file(self, path: Path, f) -> None:
        stamp = self.stamps.get(path)
        if stamp is not None:
            stamp.check(f)

    def _read(self, f, ref: TensorRef, shape: torch.Size, shapes: dict[str, torch.Size]) -> torch.Tensor:
        target = self._take(tuple(shape))
        if ref.siblings:  # a fused or transposed tensor (Baichuan's W_pack, GPT-2's Conv1D): read it whole, keep ours
            whole = read_tensor(f, ref.entry, ref.path)
            part = split_tensor(ref.entry.name, whole, self.cfg, [shapes[n] for n in ref.siblings])[ref.part]
            if tuple(part.shape) != tuple(shape):
                raise CheckpointError(f"{ref.path}: tensor {ref.entry.name!r} part has shape {tuple(part.shape)}, "
                                      f"expected {tuple(shape)}")
            target.copy_(part)
        else:
            read_into(f, ref.entry, target, ref.path)  # straight into `target` when dtypes match, else via one temporary
        if not self.allow_nonfinite:
            from .loading import check_finite

            check_finite(ref.path, ref.entry.name, target)  # in the reader thread, hidden behind the compute
        return target

    # Freed blocks' tensors are reused for the next reads: every block has the same shapes, so two sets (the block
    # computing and the one being read) serve the whole model, and the allocator never sees block-sized frees that
    # it might keep instead of returning (glibc's heap grows past its mmap threshold after such frees).
    def _take(self, shape: tuple) -> torch.Tensor:
        with self._lock:
            free = self._free.get(shape)
            if free:
                return free.pop()
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def recycle(self, tensors) -> None:
        with self._lock:
            for t in tensors:
                self._free.setdefault(tuple(t.shape), []).append(t)


def load_offloaded(model: Decoder, folder: Path, files: list[Path], device: torch.device, dtype: torch.dtype, *,
                   allow_nonfinite: bool = False) -> Decoder:
    """Fill `model` (built on `meta`) with its resident tensors and attach the BlockStore of its blocks.

    Integer tensors are refused for every weight (the header says their dtype); NaN / Inf in the resident tensors here,
    in the blocks' tensors when they stream (their bytes are read then, not here)."""
    from .loading import check_finite, check_float_weight

    pickled = [f for f in files if f.suffix != ".safetensors"]
    if pickled:
        raise CheckpointError(f"{pickled[0]}: offload=True (--offload) streams safetensors checkpoints only; this one "
                              "is pickled (convert it to safetensors, or load it without offload)")
    cfg = model.cfg
    model.to(dtype=dtype)
    for name, module in model.named_children():
        if name != "blocks":  # embeddings, final norm, unembedding (and a family's projections) stay resident
            module.to_empty(device=device)
    model.tie_weights()
    resident = {n: p for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith("blocks.")}
    filled: set[str] = set()
    layers: dict[int, dict[str, TensorRef]] = {}
    tied_head = None
    stamps = {}
    for path in files:
        with open(path, "rb") as f:
            stamps[path] = FileStamp.of_open(f, path)  # what every streamed read checks first
            for entry in read_header(f, path):
                names = _names(path, entry.name, cfg)
                if names:
                    check_float_weight(path, entry.name, entry.dtype)  # from the header: streamed blocks too
                split = needs_split(entry.name, cfg)
                siblings = tuple(n.split(".", 2)[2] for n in names) if split and names[0].startswith("blocks.") else ()
                if split and not siblings and names:
                    raise CheckpointError(f"{path}: tensor {entry.name!r} is fused or transposed outside the blocks; "
                                          "offload=True does not read such resident tensors")
                for part, name in enumerate(names):
                    if name.startswith("blocks."):
                        layer, inner = name.split(".", 2)[1:]
                        layers.setdefault(int(layer), {})[inner] = TensorRef(path, entry, part, siblings)
                    elif name == "unembed.weight" and cfg.tie_embeddings:  # compared with the embedding below
                        tied_head = (path, read_tensor(f, entry, path))
                    elif name in resident:
                        read_into(f, entry, resident[name], path)
                        if not allow_nonfinite:
                            check_finite(path, entry.name, resident[name])
                        filled.add(name)
                    else:
                        raise CheckpointError(f"{path}: tensor {entry.name!r} has no place in this config ({name})")
    missing = [n for n in resident if n not in filled and not (n == "unembed.weight" and cfg.tie_embeddings)]
    if missing:
        raise CheckpointError(f"{folder}: missing tensor for {missing[0]}")
    if tied_head is not None:
        from .tying import resolve_tied_head

        resolve_tied_head(model, tied_head[1], tied_head[0])
    _check_blocks(model, layers, folder)
    model.offload = BlockStore(layers, files, device, dtype, allow_nonfinite=allow_nonfinite, stamps=stamps, cfg=cfg)
    return model


def _names(path: Path, key: str, cfg: DecoderConfig) -> list[str]:
    try:
        return local_names(key, cfg)
    except KeyError:
        raise CheckpointError(f"{path}: unexpected tensor {key!r} for model_type {cfg.model_type!r}") from None


def _check_blocks(model: Decoder, layers: dict[int, dict[str, TensorRef]], folder: Path) -> None:
    """Fail at load time, not halfway through a forward, when a block's tensor is missing or has the wrong shape."""
    for i, block in enumerate(model.blocks):
        refs = layers.get(i, {})
        for name, p in block.named_parameters():
            ref = refs.get(name)
            if ref is None:
                raise CheckpointError(f"{folder}: missing tensor for blocks.{i}.{name}")
            if ref.siblings:
                expected = sum(dict(block.named_parameters())[n].numel() for n in ref.siblings)
                if math.prod(ref.entry.shape) != expected:
                    raise CheckpointError(f"{ref.path}: tensor {ref.entry.name!r} has shape {ref.entry.shape}, "
                                          f"expected {expected} elements for {list(ref.siblings)}")
                continue
            if tuple(ref.entry.shape) != tuple(p.shape):
                raise CheckpointError(f"{ref.path}: tensor {ref.entry.name!r} has shape {ref.entry.shape}, "
                                      f"expected {tuple(p.shape)}")


# ---------------------------------------------------------------------------------------------------------------------
# layer-major forward
# ---------------------------------------------------------------------------------------------------------------------
def _materialise(block: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    block.load_state_dict(tensors, strict=True, assign=True)


def _release(block: torch.nn.Module) -> None:
    block.to_empty(device="meta")  # drops the storage; shapes and dtypes stay for the next read


def streamed_blocks(model: Decoder, start: int | None, stop: int | None, *, progress: bool = False,
                    desc: str = "blocks") -> Iterator[torch.nn.Module]:
    """model.blocks[start:stop], each materialised while the caller runs it and freed when the caller asks for the
    next one; block j+1 is read in a background thread meanwhile. `Decoder.forward` uses it for one batch,
    `streamed_forward` for many.

    Freed tensors are reused for later reads, except with gradients enabled: autograd keeps a block's weights for the
    backward pass, so they must not be overwritten (a backward then holds every block in memory)."""
    from tqdm.auto import tqdm

    store: BlockStore = model.offload
    if store.streaming:
        raise InputError("the offloaded model was called again while it was running (e.g. from a hook): its blocks "
                         "stream one at a time, so calls cannot nest; load a second copy for the inner call")
    blocks = list(model.blocks)[start:stop]
    origin = list(model.layer_origin)[start:stop]
    reuse = not torch.is_grad_enabled()

    def read(j: int) -> dict[str, torch.Tensor]:
        shapes = {n: p.shape for n, p in blocks[j].named_parameters()}
        return store.read_block(origin[j], list(shapes), shapes)

    store.streaming = True
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="residscope-read") as reader:
            pending = reader.submit(read, 0) if blocks else None
            for j, block in enumerate(tqdm(blocks, desc=f"{desc} (streamed)", disable=not progress, leave=False)):
                waited = time.perf_counter()
                tensors = pending.result()
                store.stats.wait_seconds += time.perf_counter() - waited
                pending = reader.submit(read, j + 1) if j + 1 < len(blocks) else None  # read ahead while computing
                _materialise(block, tensors)
                try:
                    yield block
                finally:
                    _release(block)
                    if reuse:
                        store.recycle(tensors.values())
                    del tensors
    finally:
        store.streaming = False


def streamed_forward(model: Decoder, inputs: list[tuple[torch.Tensor, torch.Tensor | None]], *,
                     hooks: Callable[[int], list], stop_at_layer: int | None = None, progress: bool = False,
                     desc: str = "blocks") -> Iterator[torch.Tensor]:
    """Outputs of `model(ids, mask, stop_at_layer=...)` for every (ids, mask) of `inputs`, computed layer-major.

    hooks(i) gives the forward hooks of batch i; they are attached around every piece of batch i's forward. Yields each
    batch's logits (or residual stream with stop_at_layer) in order; the unembedding runs lazily, one batch at a time.
    """
    store: BlockStore = model.offload
    keep = torch.device("cpu") if store.activations == "cpu" else store.device
    # what Decoder.forward does before its first block, batch by batch (ids checked, left padding masked or refused)
    inputs = [model._input_ids(ids, mask, None, None, 0) for ids, mask in inputs]
    positions = [model._positions(ids.shape, ids.device, mask, None, None) for ids, mask in inputs]
    xs = []
    for i, (ids, _) in enumerate(inputs):
        with model.hooks(fwd_hooks=hooks(i)):
            xs.append(model.hook_embed(model._embed(ids)).to(keep))  # [batch, pos, d_model]
    with closing(streamed_blocks(model, None, stop_at_layer, progress=progress, desc=desc)) as blocks:
        for block in blocks:
            start = time.perf_counter()
            for i in range(len(inputs)):
                with model.hooks(fwd_hooks=hooks(i)):
                    xs[i] = block(xs[i].to(store.device), positions[i]).to(keep)
            if store.device.type == "cuda":
                torch.cuda.synchronize(store.device)
            store.stats.compute_seconds += time.perf_counter() - start
    for i in range(len(inputs)):
        out = xs[i].to(store.device)
        xs[i] = None  # each batch's activations go once the caller is done with its output
        if stop_at_layer is None:
            with model.hooks(fwd_hooks=hooks(i)):
                out = model.unembed_residual(model.ln_final(out))  # [batch, pos, vocab]
        yield out


def is_offloaded(model) -> bool:
    return getattr(model, "offload", None) is not None
