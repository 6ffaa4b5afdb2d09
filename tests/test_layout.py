"""Imports run one way: common <- model <- analyses <- probes / surgery <- apps (README "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAY_IMPORT = {
    "common": set(),
    "model": {"common"},
    "analyses": {"common", "model"},
    "probes": {"common", "model", "analyses"},
    "surgery": {"common", "model", "analyses"},
    "apps": {"common", "model", "analyses", "probes", "surgery"},
}


def residscope_imports(path: Path) -> set[str]:
    """The residscope packages a module imports (absolute `residscope.<pkg>` or relative `..<pkg>`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level >= 2 and node.module:  # from ..model import x
                names = [f"residscope.{node.module}"]
            elif node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("residscope.")}
    return found


@pytest.mark.parametrize("package", list(MAY_IMPORT))
def test_imports_point_one_way(package):
    wrong = {f"{p.relative_to(ROOT)} imports residscope.{pkg}"
             for p in (ROOT / package).glob("*.py") for pkg in residscope_imports(p) - MAY_IMPORT[package] - {package}}
    assert not wrong, sorted(wrong)
