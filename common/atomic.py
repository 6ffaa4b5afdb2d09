"""Write a file or a folder so that readers see either the old one or the whole new one, never a half-written one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it over `path`; the temp file is removed
    if writing fails. Returns `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / "dir")
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old / "dir", target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *,
               install: Callable[[Path, Path], object] = replace_dir) -> Iterator[Path]:
    """Yield an empty temp folder beside `target` (named `.<name>.tmp-*`) to fill; when the block ends normally,
    `install(tmp, target)` puts it in place (default `replace_dir`). When the block raises, the temp folder is
    deleted and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private (0700); the result is a folder readable like any other
        yield tmp
        install(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
