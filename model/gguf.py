"""GGUF file -> Hugging Face-layout folder (config.json, model.safetensors, tokenizer files), cached on disk.

For the architectures transformers' GGUF reader lacks (gptneox, olmo2) the conversion is residscope's own table of
llama.cpp's converter, inverted (model/gguf_archs.py). For the others it is transformers' own GGUF support:
`AutoConfig` / `AutoTokenizer` with `gguf_file=` for the config and tokenizer, and `load_gguf_checkpoint` (the `gguf` package's reader and dequantiser plus transformers'
per-architecture fixes) for the weights. Those fixes are what make the folder equal to transformers' GGUF loading:
- llama: llama.cpp permutes the rows of q/k into interleaved-pair RoPE order; transformers undoes the permutation.
- gemma3: llama.cpp stores every `*norm.weight` as w + 1 (Gemma's RMSNorm multiplies by 1 + w); transformers subtracts 1.
What a file states and transformers' reader drops (LongRoPE factor tensors, a partial rotary dimension, Gemma 2's
soft-caps or attention scale other than its defaults) would make a different model: such a file is refused
(`_unread_by_transformers`), as is an architecture neither transformers nor gguf_archs reads.
We write the result in float32 with the names and layout `save_pretrained` would use, so every loader (ours,
transformers' `from_pretrained(folder)`) reads the same numbers.

Cache: `cache_root() / "gguf" / f"{stem}-{key}"`, where the key hashes the file's resolved path, size, mtime, the first
MiB of its content, the conversion-format version and the transformers / gguf versions. A folder is used only if its
completion marker (`residscope_cache.json`, written last) matches the key and every file it lists has the listed size
and sha256 (a same-size corruption of the weights would otherwise load as NaN or wrong numbers); anything else is
rebuilt. Hashing costs 0.4 CPU-s per use for SmolLM2-135M's 538 MB, more than loading it, so a file is hashed only
when its stat stamp (size, mtime, ctime, inode) differs from the one recorded in `residscope_verified.json` after its
last good hash: every write through the file system sets ctime to the current time, and no user-space call can set it
back, so an unchanged stamp proves unchanged content (a stamp is recorded only once the file's ctime is a few seconds
old, so a write in the same clock tick as the hash cannot hide; the rule git uses for its index). A conversion writes into a temp folder beside the target and renames it into place, so a
crash leaves no target and two concurrent conversions cannot corrupt each other (the loser uses the winner's folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import struct
import threading
import time
from pathlib import Path

from residscope.common.atomic import atomic_dir

from .errors import CheckpointError, MissingFileError
from .gguf_archs import own_mapping, write_own_hf_folder

log = logging.getLogger(__name__)

CONVERSION_FORMAT = 1  # bump when the folder layout or the conversion changes: old caches are rebuilt
MARKER = "residscope_cache.json"
WEIGHTS = "model.safetensors"
_HEAD_BYTES = 1 << 20  # hashed into the cache key: catches a file replaced in place with the same size and mtime
_STALE_TMP_SECONDS = 6 * 3600  # temp folders older than this belong to a crashed conversion


def cache_root() -> Path:
    """Where residscope keeps converted models: `$RESIDSCOPE_CACHE`, else `~/.cache/residscope`."""
    env = os.environ.get("RESIDSCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "residscope"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def gguf_cache_key(gguf_path: str | os.PathLike) -> str:
    """A 16-hex key that changes whenever the file, the conversion format or the converting libraries change."""
    path = Path(gguf_path).resolve()
    st = path.stat()
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(_HEAD_BYTES))
    ident = [str(path), st.st_size, st.st_mtime_ns, h.hexdigest(), CONVERSION_FORMAT,
             _version("transformers"), _version("gguf")]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def cache_folder_for(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
                     key: str | None = None) -> Path:
    """The folder a GGUF file converts into (it may not exist yet)."""
    base = Path(cache_dir) if cache_dir is not None else cache_root() / "gguf"
    return base / f"{Path(gguf_path).stem}-{key or gguf_cache_key(gguf_path)}"


# ---- completion marker ---------------------------------------------------------------------------

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _write_marker(folder: Path, key: str, source: Path) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}
    st = source.stat()
    marker = {"format": CONVERSION_FORMAT, "key": key, "source": str(source), "source_size": st.st_size,
              "source_mtime_ns": st.st_mtime_ns, "transformers": _version("transformers"), "gguf": _version("gguf"),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, folder / MARKER)


def cache_problem(folder: str | os.PathLike, key: str | None = None, *, full: bool = False) -> str | None:
    """Why a cached folder cannot be used (None when it can): missing marker, other key, missing or mis-sized file.

    `full=True` also compares each file's sha256 with the marker (reads every byte: about a second per GB).
    """
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER).read_text())
    except FileNotFoundError:
        return f"{folder}: no completion marker {MARKER}"
    except (OSError, ValueError) as e:
        return f"{folder}: unreadable completion marker ({e})"
    if not isinstance(marker, dict) or marker.get("format") != CONVERSION_FORMAT:
        return f"{folder}: conversion format {marker.get('format') if isinstance(marker, dict) else '?'} != {CONVERSION_FORMAT}"
    if key is not None and marker.get("key") != key:
        return f"{folder}: cache key {marker.get('key')} != {key}"
    files = marker.get("files") or {}
    for required in ("config.json", WEIGHTS):
        if required not in files:
            return f"{folder}: marker lists no {required}"
    for name, info in files.items():
        path = folder / name
        if not path.is_file():
            return f"{folder}: missing {name}"
        if path.stat().st_size != info.get("size"):
            return f"{folder}: {name} has {path.stat().st_size} bytes, expected {info.get('size')}"
        if full and _sha256_file(path) != info.get("sha256"):
            return f"{folder}: {name} does not match its sha256"
    return None


VERIFIED = "residscope_verified.json"  # stat stamps of the files whose sha256 matched the marker
_RACY_SECONDS = 3.0  # a file changed this recently may change again within the same ctime tick: no stamp yet


def _stat_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def verified_problem(folder: str | os.PathLike, key: str | None = None) -> str | None:
    """`cache_problem` plus content: each file's sha256 must match the marker. A file whose stat stamp equals the one
    recorded after its last good hash is not hashed again (see the module docstring for why that is safe)."""
    folder = Path(folder)
    problem = cache_problem(folder, key)
    if problem is not None:
        return problem
    files = json.loads((folder / MARKER).read_text())["files"]
    try:
        known = json.loads((folder / VERIFIED).read_text())
    except (OSError, ValueError):
        known = {}
    stamps = {}
    for name, info in files.items():
        path = folder / name
        stamp = _stat_stamp(path)  # before hashing: a write while we hash changes ctime, so it is not stamped
        if known.get(name) != stamp:
            if _sha256_file(path) != info.get("sha256"):
                return f"{folder}: {name} does not match its sha256"
            if time.time_ns() - stamp[2] < _RACY_SECONDS * 1e9:
                continue
        stamps[name] = stamp
    if stamps != known:
        with contextlib.suppress(OSError):  # a read-only cache still works: it is hashed on every use
            tmp = folder / f".{VERIFIED}.tmp-{os.getpid()}-{threading.get_ident()}"
            tmp.write_text(json.dumps(stamps))
            os.replace(tmp, folder / VERIFIED)
    return None


# ---- conversion ----------------------------------------------------------------------------------

_PARSE_LOCK = threading.Lock()


@contextlib.contextmanager
def _one_gguf_parse():
    """Share one `gguf.GGUFReader` per file while converting.

    transformers' config, tokenizer and weight loaders each build their own reader, and its pure-Python parse of the
    vocabulary dominates a conversion (3 x 7 s for SmolLM2's 49k tokens, 3 x 50 s for Gemma 3's 262k on 2 cores).
    """
    import gguf

    with _PARSE_LOCK:
        original = gguf.GGUFReader
        readers: dict[tuple[str, str], object] = {}

        def shared_reader(path, mode="r"):
            key = (os.path.realpath(path), mode)
            if key not in readers:
                readers[key] = original(path, mode)
            return readers[key]

        gguf.GGUFReader = shared_reader
        try:
            yield
        finally:
            gguf.GGUFReader = original
            readers.clear()


def write_hf_folder(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Convert a GGUF file into `out_dir` (must exist, may be empty): config.json, generation_config.json,
    model.safetensors (float32, transformers names), tokenizer.json, tokenizer_config.json, chat template.

    Not atomic by itself: `convert_gguf` calls it on a temp folder.
    """
    gguf_path = Path(gguf_path).resolve()
    with _one_gguf_parse():
        try:
            _write_hf_folder(gguf_path, Path(out_dir))
        except (struct.error, EOFError) as e:  # the metadata parsers read past the end of a truncated file
            raise CheckpointError(f"{gguf_path}: truncated or corrupt GGUF file ({e})") from None


def _write_hf_folder(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    spec = own_mapping(_architecture(gguf_path))
    if spec is not None:
        write_own_hf_folder(gguf_path, out_dir, spec)
        return
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise CheckpointError(f"{gguf_path}: transformers cannot read this GGUF file ({str(e).splitlines()[0]})") from e
    problem = _unread_by_transformers(gguf_path, config)
    if problem is not None:
        raise CheckpointError(f"{gguf_path}: transformers' GGUF reader ignores {problem}; the model it builds would "
                              "compute something else, so residscope does not load it")
    # The converted model's parameters only exist on the meta device: they give transformers' tensor-name map.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32)
    tensors = parsed["tensors"]

    expected = skeleton.state_dict()
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(tensors) - tied)
    if missing:
        raise CheckpointError(f"{gguf_path}: GGUF has no tensor for {missing[0]} ({len(missing)} missing in all)")
    for key, tensor in tensors.items():
        if key not in expected:
            raise CheckpointError(f"{gguf_path}: unexpected tensor {key}")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{gguf_path}: tensor {key} has shape {tuple(tensor.shape)}, "
                                  f"config expects {tuple(expected[key].shape)}")
    tensors = {k: t.to(torch.float32).contiguous() for k, t in tensors.items() if k not in tied}
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    del tensors, parsed

    # What model.save_pretrained would record for a float32 model of this class.
    config.architectures = [type(skeleton).__name__]
    config.dtype = torch.float32
    config.save_pretrained(out_dir)
    with contextlib.suppress(ValueError):
        GenerationConfig.from_model_config(config).save_pretrained(out_dir)

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(out_dir)


def _architecture(gguf_path: Path) -> str | None:
    import gguf

    try:
        field = gguf.GGUFReader(str(gguf_path)).fields.get("general.architecture")  # the shared parse
    except (ValueError, IndexError) as e:  # bad magic, version, duplicate tensor names; a truncated file
        raise CheckpointError(f"{gguf_path}: truncated, corrupt or not a GGUF file ({str(e).splitlines()[0]})") from None
    return None if field is None else field.contents()


def _unread_by_transformers(gguf_path: Path, config) -> str | None:
    """What the file states that transformers' config reader dropped (None when nothing): LongRoPE factor tensors
    (llama.cpp's Phi-3.5 / Phi-4 files), or a rotary dimension other than the one the config rotates (partial rotary)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))  # the shared parse (see _one_gguf_parse)
    factors = sorted(t.name for t in reader.tensors if t.name.startswith("rope_factors"))
    if factors:
        return f"the LongRoPE factors (tensor {factors[0]})"
    arch = reader.fields["general.architecture"].contents()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def stated(key: str):
        field = reader.fields.get(f"{arch}.{key}")
        return None if field is None else field.contents()

    partial = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    rotated = int(head_dim * partial)
    if stated("rope.dimension_count") not in (None, rotated):
        return f"{arch}.rope.dimension_count={stated('rope.dimension_count')} (it rotates {rotated} of {head_dim} dims)"
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):  # Gemma 2: the config keeps its defaults
        value = stated(key)
        if value is not None and getattr(config, key, None) != value:
            return f"{arch}.{key}={value:g} (it uses {getattr(config, key, None)})"
    if arch == "gemma2":  # llama.cpp scales 27B's scores by (d_model / heads)^-1/2 (46 layers), the others by head_dim's
        scalar = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 46 else head_dim
        if config.query_pre_attn_scalar != scalar:
            return f"the attention scale llama.cpp derives for this file (query_pre_attn_scalar {scalar}; it uses {config.query_pre_attn_scalar})"
    return None


def remove_stale_temp(parent: Path) -> None:
    """Delete temp folders / files (`.<name>.tmp-*`) that a crashed conversion left behind hours ago."""
    now = time.time()
    for p in parent.glob(".*.tmp-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink()


def _install_folder(tmp: Path, target: Path, key: str) -> Path:
    """Rename a complete temp folder to `target`; if another process got there first with a good folder, use that."""
    try:
        os.rename(tmp, target)
        return target
    except OSError:
        pass  # the target exists: a concurrent winner, or a corrupt cache we were asked to replace
    if cache_problem(target, key, full=True) is None:
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    trash = target.with_name(f".{target.name}.tmp-trash-{os.getpid()}-{time.monotonic_ns()}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(target, trash)
    try:
        os.rename(tmp, target)
    except OSError:
        if cache_problem(target, key, full=True) is not None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # a third process installed a good folder meanwhile
    shutil.rmtree(trash, ignore_errors=True)
    return target


def convert_gguf(gguf_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                 force: bool = False) -> Path:
    """The Hugging Face-layout folder for a GGUF file: the cached one if it is complete, else a fresh conversion.

    `cache_dir` defaults to `cache_root() / "gguf"`; `force=True` converts again even over a good cache.
    Raises FileNotFoundError for a missing file and CheckpointError for a file transformers cannot convert.
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise MissingFileError(f"GGUF file not found: {gguf_path}")
    gguf_path = gguf_path.resolve()
    key = gguf_cache_key(gguf_path)
    target = cache_folder_for(gguf_path, cache_dir, key=key)
    if not force:
        problem = verified_problem(target, key)
        if problem is None:
            return target
        if target.exists():
            log.warning("rebuilding cached conversion: %s", problem)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(target.parent)
    log.info("converting %s to a float32 Hugging Face folder in %s (once; cached afterwards)", gguf_path.name, target.parent)

    def install(tmp: Path, target: Path) -> None:
        if force and target.exists():  # else a good cache would win below, taken for a concurrent conversion's
            stale = target.with_name(f".{target.name}.tmp-trash-{os.getpid()}-{time.monotonic_ns()}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        _install_folder(tmp, target, key)

    with atomic_dir(target, install=install) as tmp:
        write_hf_folder(gguf_path, tmp)
        _write_marker(tmp, key, gguf_path)
    return target
