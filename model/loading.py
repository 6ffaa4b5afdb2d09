"""load_model / load_config: Hugging Face folders (and, through the registry, GGUF files and aliases) -> Decoder.

Weights stream tensor by tensor from safetensors straight into parameters of the target dtype and device, so peak memory
stays near the model's own size. Pickled `.bin` checkpoints are refused unless `allow_pickle=True`; remote code never runs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .checkpoint import hf_key_for, local_names, needs_split, split_tensor
from .config import DecoderConfig
from .decoder import Decoder
from .errors import CheckpointError, InputError
from .registry import resolve_source
from .safetensors_io import iter_entries, read_into, read_tensor
from .tying import resolve_tied_head

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_config(source: str | os.PathLike, *, position_embedding: str | None = None) -> DecoderConfig:
    """The DecoderConfig of a folder, GGUF file or alias, without loading weights."""
    folder = resolve_source(source)
    return DecoderConfig.from_json(folder / "config.json", position_embedding=position_embedding)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise InputError(f"dtype {dtype!r} not supported (choose from {', '.join(sorted(_DTYPES))})")
    return _DTYPES[dtype]


def parse_device(device: str | torch.device) -> torch.device:
    """A torch device this machine has: a typo or an accelerator the torch build lacks is refused in one line."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cpu" or dev.type == "meta":
        return dev
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available,
                 "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available()}.get(dev.type)
    if available is None or not available():
        raise InputError(f"device {str(dev)!r} is not available with this torch build / machine (torch "
                         f"{torch.__version__}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"device {str(dev)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_dtype_on_device(dtype: torch.dtype, device: torch.device) -> None:
    """Fail early, with one line, where the device cannot run matmuls in this dtype."""
    if dtype not in set(_DTYPES.values()):
        raise CheckpointError(f"dtype {dtype} is not supported (use float32, float64, bfloat16 or float16)")
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        (a @ a).sum().item()
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"dtype {dtype} is not supported on device {device}: {str(e).splitlines()[0]}") from None


def load_model(
    source: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    *,
    allow_pickle: bool = False,
    position_embedding: str | None = None,
    load_tokenizer: bool = True,
    allow_nonfinite: bool = False,
    offload: bool = False,
    device_map: str | dict | None = None,
) -> Decoder:
    """Load a checkpoint folder (config.json + safetensors, single or sharded), a GGUF file or an alias.

    position_embedding: Baichuan 2 only, "rope" or "alibi" to override the choice made from the config.
    allow_nonfinite: load tensors holding NaN or Inf instead of refusing them (to inspect a broken checkpoint).
    offload: keep the blocks on disk and stream them one at a time through the analyses (`residscope.model.offload`);
    the embeddings, final norm and unembedding are loaded. Safetensors checkpoints only.
    device_map: "auto" or {"blocks.0-15": "cuda:0", "blocks.16-31": "cuda:1"} places contiguous blocks on several
    devices (`residscope.model.device_map`); it replaces `device`.
    """
    if offload and device_map is not None:
        raise InputError("offload and device_map: choose one (streaming runs one block at a time on `device`)")
    device, dtype = parse_device(device), parse_dtype(dtype)
    folder = resolve_source(source)
    cfg = DecoderConfig.from_json(folder / "config.json", position_embedding=position_embedding)
    check_dtype_on_device(dtype, device)
    tokenizer = load_tokenizer_from(folder) if load_tokenizer else None  # before the weights: a bad file fails fast
    check_vocab_size(cfg, tokenizer, folder)

    with torch.device("meta"):
        model = Decoder(cfg, source=str(source))
    if offload:
        from .offload import load_offloaded

        load_offloaded(model, folder, weight_files(folder, allow_pickle=True), device, dtype,
                       allow_nonfinite=allow_nonfinite)
    else:
        if device_map is not None:
            from .device_map import place, resolve_device_map

            plan = resolve_device_map(device_map, model.to(dtype=dtype), dtype)
            for d in dict.fromkeys(plan):
                check_dtype_on_device(dtype, torch.device(d))
            place(model, plan)
        else:
            model = model.to(dtype=dtype).to_empty(device=device)
            model.tie_weights()
        try:
            _load_weights(model, folder, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
        except PermissionError as e:
            raise CheckpointError(f"{e.filename or folder}: permission denied") from None
    model.source_folder = folder  # the resolved folder (an alias's or a GGUF's too): exports refuse to write over it
    model.eval()
    # assigning the tokenizer (even None) re-syncs what the config reports: device, dtype, BOS behaviour, model name
    model.tokenizer = tokenizer
    return model


def weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """The checkpoint's weight files, index and headers checked against each other (`shards.weight_files`)."""
    from .shards import weight_files as checked_weight_files

    return checked_weight_files(folder, allow_pickle)


def check_float_weight(path: Path, key: str, dtype: torch.dtype) -> None:
    """Refuse integer / bool tensors for float parameters: casting int8 codes to floats loads without complaint and
    computes garbage (they would need a quantisation scale this format does not carry)."""
    if not dtype.is_floating_point:
        raise CheckpointError(f"{path}: tensor {key!r} has dtype {str(dtype).removeprefix('torch.')}, "
                              "expected a floating-point weight (integer tensors are not cast)")


def check_finite(path: Path, key: str, tensor: torch.Tensor) -> None:
    """Refuse a tensor holding NaN or Inf, which would only show up later as NaN logits.

    One reduction without a temporary: a sum is NaN or Inf whenever an element is (NaN and Inf propagate through
    every partial sum), so a finite sum proves every element finite. A non-finite sum from finite elements (overflow,
    e.g. float16) falls through to the exact count."""
    if bool(torch.isfinite(tensor.sum())):
        return
    bad = int(tensor.numel() - torch.isfinite(tensor).sum())
    if bad:
        raise CheckpointError(f"{path}: tensor {key!r} holds {bad} NaN or Inf value{'s' * (bad > 1)} "
                              f"(in {str(tensor.dtype).removeprefix('torch.')}); load_model(..., allow_nonfinite=True) "
                              "or `residscope --allow-nonfinite ...` loads it anyway")


def _load_weights(model: Decoder, folder: Path, *, allow_pickle: bool, allow_nonfinite: bool = False) -> None:
    cfg = model.cfg
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[str] = set()
    tied_head: list[tuple[Path, torch.Tensor]] = []  # a tied model's lm_head in the file, compared once all is in

    def targets(path: Path, key: str) -> list[tuple[str, torch.Tensor]]:
        try:
            names = local_names(key, cfg)
        except KeyError:
            raise CheckpointError(f"{path}: unexpected tensor {key!r} for model_type {cfg.model_type!r}") from None
        for name in names:
            if name not in params:
                raise CheckpointError(f"{path}: tensor {key!r} has no place in this config ({name})")
        return [(name, params[name]) for name in names]

    def split_parts(path: Path, key: str, tensor: torch.Tensor, pairs) -> list[torch.Tensor]:
        shapes = [target.shape for _, target in pairs]
        try:
            return split_tensor(key, tensor, cfg, shapes)
        except RuntimeError:  # the fused tensor's size does not divide into the parameters
            raise CheckpointError(f"{path}: tensor {key!r} of shape {tuple(tensor.shape)} does not split into "
                                  f"{[tuple(s) for s in shapes]}") from None

    def place(path: Path, key: str, shape: tuple, name: str, target: torch.Tensor, copy) -> None:
        if name == "unembed.weight" and cfg.tie_embeddings:  # tied: the embedding is the unembedding, unless...
            head = torch.empty(tuple(shape), dtype=target.dtype)
            copy(head)
            tied_head[:] = [(path, head)]  # ...the file's lm_head differs (model/tying.py)
            return
        if tuple(shape) != tuple(target.shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(shape)}, expected {tuple(target.shape)}")
        with torch.no_grad():
            copy(target)
        if not allow_nonfinite:
            check_finite(path, key, target)  # after the copy: the bytes are in cache, and a cast may overflow
        filled.add(name)

    for path in weight_files(folder, allow_pickle):
        if path.suffix == ".bin":
            for key, tensor in torch.load(path, map_location="cpu", weights_only=True, mmap=True).items():
                pairs = targets(path, key)
                if not pairs:
                    continue
                check_float_weight(path, key, tensor.dtype)
                parts = split_parts(path, key, tensor, pairs)
                for (name, target), part in zip(pairs, parts):
                    place(path, key, part.shape, name, target, lambda t, part=part: t.copy_(part))
            continue
        for f, entry in iter_entries(path):
            pairs = targets(path, entry.name)
            if pairs:
                check_float_weight(path, entry.name, entry.dtype)
            if len(pairs) == 1 and not needs_split(entry.name, cfg):  # the common case: bytes go straight in
                name, target = pairs[0]
                place(path, entry.name, entry.shape, name, target, lambda t: read_into(f, entry, t, path))
            elif pairs:  # a fused or transposed tensor: read whole, split into the parameters' shapes
                parts = split_parts(path, entry.name, read_tensor(f, entry, path), pairs)
                for (name, target), part in zip(pairs, parts):
                    place(path, entry.name, part.shape, name, target, lambda t, part=part: t.copy_(part))
    missing = [n for n in params if n not in filled and not (n == "unembed.weight" and cfg.tie_embeddings)]
    if missing:
        key = hf_key_for(missing[0], cfg)
        what = f"missing tensor {key!r} (residscope's {missing[0]})" if key else f"missing tensor for {missing[0]}"
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{folder}: {what}{more}")
    if tied_head:
        resolve_tied_head(model, tied_head[0][1], tied_head[0][0])


def load_tokenizer_from(folder: Path):
    """The folder's tokenizer (local files only, no remote code); None when it has no tokenizer files. Files that exist
    but cannot be loaded are an error naming the file and why (a model silently without its tokenizer would fail later
    with "the model has no tokenizer", naming nothing)."""
    present = [f for f in _TOKENIZER_FILES if (folder / f).is_file()]
    if not present:
        return None
    from transformers import AutoTokenizer

    from .sp_tokenizer import is_baichuan_tokenizer_folder, load_baichuan_tokenizer

    check_tokenizer_json(folder)
    try:
        if is_baichuan_tokenizer_folder(folder):  # its remote-code class, rebuilt here: nothing from the folder runs
            return load_baichuan_tokenizer(folder)
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - whatever the tokenizer library raises, the user gets the file and the reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        main = [f for f in ("tokenizer.json", "tokenizer.model") if f in present] or present
        culprit = next((f for f in present if f in str(e)), main[0])
        raise CheckpointError(f"{folder / culprit}: the tokenizer cannot be loaded ({reason})") from None


_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def check_tokenizer_json(folder: Path) -> None:
    """The tokenizer's JSON files parse (a truncated tokenizer.json otherwise fails deep in the tokenizers library)."""
    for name in _TOKENIZER_JSON:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
        except json.JSONDecodeError as e:
            hint = " (truncated?)" if e.pos >= len(path.read_text(encoding="utf-8")) - 1 else ""
            raise CheckpointError(f"{path}: not valid JSON{hint}: {e.msg} (line {e.lineno}, column {e.colno})") from None
        except PermissionError:
            raise CheckpointError(f"{path}: permission denied") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got a {type(data).__name__}")


def check_vocab_size(cfg: DecoderConfig, tokenizer, folder: Path) -> None:
    """The tokenizer's ids must index the embedding: config.json's vocab_size may be larger (padded), never smaller."""
    if tokenizer is not None and len(tokenizer) > cfg.d_vocab:
        raise CheckpointError(f"{folder / 'config.json'}: vocab_size {cfg.d_vocab} is smaller than the tokenizer's "
                              f"{len(tokenizer)} tokens (its ids {cfg.d_vocab}..{len(tokenizer) - 1} have no embedding)")
