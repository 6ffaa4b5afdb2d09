"""atomic_write: readers see the old file or the whole new one, and a failed write leaves nothing behind."""

from __future__ import annotations

import pytest

from residscope.model.atomic import atomic_write, atomic_write_text


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
