"""The analysis notebooks run top to bottom (nbclient, one kernel each, with a timeout): on a tiny random checkpoint plus
the zoo, and (`real`) on the bundled SmolLM2-135M. Committed notebooks carry no outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from tiny_llama import make_tiny_checkpoint

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("positional_vectors", "rope_bounds", "context_extension", "shortgpt_pruning")
TIMEOUT = 600  # seconds per cell: generous for a busy 2-core machine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("notebooks") / "tiny"))


def execute(name: str, workdir: Path, monkeypatch, model: str, zoo: bool):
    from nbclient import NotebookClient

    monkeypatch.setenv("RESIDSCOPE_NOTEBOOK_MODEL", model)
    monkeypatch.setenv("RESIDSCOPE_NOTEBOOK_ZOO", "1" if zoo else "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(book, timeout=TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    return book


def text_outputs(book) -> str:
    parts = []
    for cell in book.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") if out.get("output_type") == "stream" else "")
    return "".join(parts)


def test_the_four_notebooks_exist():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_have_no_outputs(name):
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(book)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: stored outputs (strip them)"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_on_a_tiny_model_and_the_zoo(name, tiny, tmp_path, monkeypatch):
    book = execute(name, tmp_path, monkeypatch, tiny, zoo=True)
    text = text_outputs(book)
    assert "zoo models here:" in text
    if name == "shortgpt_pruning":
        assert "same logits: True" in text and "LLM-Streamline: blocks" in text and "healed without" in text
    if name == "context_extension":  # the RULER cell: its table and one answer per task
        assert "average" in text and "niah_single_1: answered" in text and "fwe: answered" in text


@pytest.mark.real
@pytest.mark.parametrize("name", [n for n in NAMES if n != "rope_bounds"])
def test_notebook_runs_on_the_bundled_model(name, real_model, tmp_path, monkeypatch):
    book = execute(name, tmp_path, monkeypatch, "smollm2-135m", zoo=False)
    text = text_outputs(book)
    if name == "shortgpt_pruning":
        assert "same logits: True" in text and "least influential 8 of 30" in text
    if name == "positional_vectors":
        assert "30 layers" in text
