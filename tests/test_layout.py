"""Imports run one way: common <- model <- runtime <- analyses <- probes / surgery <- evaluate / studies <- apps
(README "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAY_IMPORT = {
    "common": set(),
    "model": {"common"},
    "runtime": {"common", "model"},
    "analyses": {"common", "model", "runtime"},
    "probes": {"common", "model", "runtime", "analyses"},
    "surgery": {"common", "model", "runtime", "analyses"},
    "evaluate": {"common", "model", "runtime", "analyses", "probes", "surgery"},
    "studies": {"common", "model", "runtime", "analyses", "probes", "surgery"},
    "apps": {"common", "model", "runtime", "analyses", "probes", "surgery", "evaluate", "studies"},
}


def imported_modules(path: Path, package: str) -> set[str]:
    """Dotted names of the residscope modules (or packages) a file in `package` imports, relative imports resolved."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y / from ..model import y
                parent = ["residscope", package][: 3 - node.level]
                base = ".".join(parent + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("residscope.")}


@pytest.mark.parametrize("package", list(MAY_IMPORT))
def test_imports_point_one_way(package):
    wrong = set()
    for path in (ROOT / package).glob("*.py"):
        module = f"residscope.{package}.{path.stem}"
        imports = imported_modules(path, package)
        allowed = MAY_IMPORT[package] | {package}
        wrong |= {f"{module} imports {name}" for name in imports if name.split(".")[1] not in allowed}
    assert not wrong, sorted(wrong)
