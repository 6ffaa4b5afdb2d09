"""Write a file or a folder so that readers see either the old one or the whole new one, never a half-written one;
and refuse an output path that cannot be written before any long computation starts.

Every temporary name made here is `.<target name>.tmp-<pid>-<random>` (or `.old-` for a folder being replaced), in the
target's own folder so the final rename stays on one file system. A run killed with SIGKILL cannot delete its
temporaries; the next write into the same folder removes those whose process no longer exists (`clean_stale`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import InputError

_TEMP_NAME = re.compile(r"^\..+\.(?:tmp|old)-(\d+)-[0-9a-f]{8}$")


def temp_sibling(target: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name beside `target` that embeds this process's id (not created)."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries in `folder` left by residscope processes that no longer exist; returns what was removed.
    Temporaries of live processes (a concurrent run) are left alone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or _process_exists(int(match.group(1))):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it over `path`; the temp file is removed
    if writing fails (or is interrupted). Returns `path`."""
    path = Path(path)
    clean_stale(path.parent)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename the folder `tmp` to `target`. An existing target is moved aside first, put back if the rename fails,
    and deleted only once the new folder is in place."""
    old = None
    if target.exists():
        old = temp_sibling(target, "old")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, install: Callable[[Path, Path], object] = replace_dir) -> Iterator[Path]:
    """Yield an empty temp folder beside `target` to fill; when the block ends normally, `install(tmp, target)` puts
    it in place (default `replace_dir`). When the block raises (or is interrupted), the temp folder is deleted and
    `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent)
    tmp = temp_sibling(target)
    tmp.mkdir()  # mode 0777 & ~umask, like any folder the user makes (mkdtemp would make it private)
    try:
        yield tmp
        install(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- refusing an output path before the work -------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_can_create_in(folder: Path, what: str) -> None:
    """Create and remove a probe folder: the only check that holds for root, read-only mounts and ACLs alike."""
    probe = temp_sibling(folder / "probe")
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise InputError(f"{what}: cannot write in {folder} ({e.strerror or errno.errorcode.get(e.errno, e)})") from None


def _check_parent_creatable(path: Path, what: str) -> None:
    """`path` can be created: its nearest existing ancestor is a folder we can write in."""
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise InputError(f"{what}: {existing} is not a folder")
    _check_can_create_in(existing, what)


def _real(path: str | os.PathLike) -> Path:
    """Absolute, symlinks resolved (for comparing an output with inputs: `a/../b`, `~/x` and links name one place)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def check_not_input(path: str | os.PathLike, what: str, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuse an output `path` that is one of `inputs`, contains one (replacing it deletes the input) or lies inside an
    input folder (writing there changes the input): the checkpoint being read, the --text file, ... `None` items are
    skipped, so callers can pass optional inputs as they are."""
    out = _real(path)
    for item in inputs:
        if item is None:
            continue
        source = _real(item)
        if out == source:
            raise InputError(f"{what}: {path} is the input {item} itself; write the output somewhere else")
        if source.is_relative_to(out):
            raise InputError(f"{what}: {path} contains the input {item}; write the output somewhere else")
        if out.is_relative_to(source) and source.is_dir():
            raise InputError(f"{what}: {path} is inside the input folder {item}; write the output somewhere else")


def check_output_dir(path: str | os.PathLike, what: str = "out", *, force: bool = False,
                     inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """THE check of an output folder, before any work: not a file, not one of `inputs` (nor containing or inside one,
    even with `force`), empty unless `force` (which replaces it whole), its folder writable. `what` names the argument
    in the message (e.g. "--out"). Returns the path, user-expanded."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{what}: {path} exists and is not a folder")
    check_not_input(path, what, inputs)
    if path.is_dir() and any(path.iterdir()) and not force:
        raise InputError(f"{what}: {path} exists and is not empty (use --force / force=True to replace it)")
    _check_parent_creatable(path, what)
    return path


def check_output_file(path: str | os.PathLike, what: str = "path", *,
                      inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """THE check of an output file named by the user (e.g. --html): not a folder, not one of `inputs` nor inside an
    input folder, its folder writable (or creatable). An existing file is replaced (temp, then rename): the user named
    it. Returns the path, user-expanded."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{what}: {path} is a folder, not a file")
    check_not_input(path, what, inputs)
    _check_parent_creatable(path, what)
    return path
