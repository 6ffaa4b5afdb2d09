"""atomic_write / atomic_dir: readers see the old file (folder) or the whole new one, and a failed write leaves nothing
behind."""

from __future__ import annotations

import pytest

from residscope.common.atomic import atomic_dir, atomic_write, atomic_write_text


def test_replaces_whole_file(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    assert atomic_write_text(target, "new") == target
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "figure.html"
    target.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["figure.html"]


def test_atomic_dir_replaces_whole_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.json").write_text("old")
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.tmp-") and not any(tmp.iterdir())
        (tmp / "config.json").write_text("new")
        assert (target / "old.json").read_text() == "old"  # untouched until the block ends
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert target.stat().st_mode & 0o755 == 0o755  # readable like any folder, not mkdtemp's private 0700


def test_atomic_dir_failure_keeps_old_folder_and_removes_temp(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.json").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("half")
            raise OSError("disk full")
    assert sorted(p.name for p in target.iterdir()) == ["old.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_custom_install(tmp_path):
    seen = []
    with atomic_dir(tmp_path / "cache" / "entry", install=lambda tmp, target: seen.append((tmp.name, target.name))) as tmp:
        pass
    assert seen == [(tmp.name, "entry")]
