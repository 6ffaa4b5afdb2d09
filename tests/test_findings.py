"""Every command behind docs/findings.md runs at a tiny size on the zoo models, so the write-up cannot rot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from residscope.studies import findings


@pytest.fixture(autouse=True)
def html_figures(monkeypatch):
    """The same output wherever the suite runs: HTML figures, whether or not the optional kaleido (PNG) is installed
    (kaleido drives a browser and can time out on a loaded machine; the PNGs in docs/ are drawn separately)."""
    monkeypatch.setattr(findings, "can_write_png", lambda: False)


def _run(tmp_path, *argv) -> dict:
    assert findings.main([*argv, "--out", str(tmp_path)]) == 0
    question = argv[0]
    name = "positional" if question == "positional" else question
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / f"{name}.png").exists() or (tmp_path / f"{name}.html").exists()
    return data


def test_rope_table_marks_the_published_4k_base_as_failing(tmp_path):
    data = _run(tmp_path, "rope-table", "--lengths-table", "1024,4096")
    by_length = {r["length"]: r for r in data["rows"]}
    # RESEARCH.md: at 4k the infimum lies between 26952 and 26953, and the published 2.7e4 fails
    assert 26952 < by_length[4096]["ours"] < 26953
    assert by_length[4096]["published_holds"] is False and by_length[4096]["published_min_b"] < 0
    assert by_length[4096]["published_min_at"] <= 4096
    assert by_length[1024]["published_holds"] is True
    for r in data["rows"]:
        assert r["ours_verified"] and r["ours_min_b"] >= 0


def test_shortgpt_on_zoo(tmp_path):
    data = _run(tmp_path, "shortgpt", "--models", "zoo-rope", "--seq-len", "64", "--samples", "4", "--eval-samples", "4",
                "--seeds", "2")
    r = data["models"]["zoo-rope"]
    assert r["removed_count"] == 1 and sorted(r["orders"]["bi"]) == list(range(r["n_layers"]))
    assert {row["method"] for row in r["rows"]} == {"bi", "angular", "relative-magnitude", "sequential", "reverse",
                                                   "random (mean of 2)"}
    assert all(math.isfinite(row["ppl"]) and row["ppl"] > 1 for row in r["rows"])
    # removing the last whole layer is the reverse baseline with one layer
    reverse = next(row for row in r["rows"] if row["method"] == "reverse")
    assert r["last_layer"]["whole layer"] == pytest.approx(reverse["ppl"])
    assert set(r["last_layer"]) == {"dense", "attention", "mlp", "whole layer"}


def test_positional_and_removal_on_zoo(tmp_path):
    data = _run(tmp_path, "positional", "--models", "zoo-rope", "--seq-len", "32", "--samples", "8", "--eval-samples",
                "4", "--attn-samples", "4", "--probe-tokens", "128")
    r = data["models"]["zoo-rope"]
    assert len(r["first_token_ratio"]) == r["n_layers"] + 1 and len(r["sink_mass_by_block"]) == r["n_layers"]
    assert set(r["by_kind"]["sink_mass"]) == set(r["layer_types"])
    removal = json.loads((tmp_path / "pv-removal.json").read_text())["models"]["zoo-rope"]
    assert removal["rows"][0]["label"] == "original" and len(removal["rows"]) == 3


def test_rope_retrieval_on_zoo(tmp_path):
    data = _run(tmp_path, "rope-retrieval", "--models", "zoo-rope", "--bases", "1e4,1e2", "--lengths", "100",
                "--keys", "2", "--eval-tokens", "1000")
    assert data["bounds"] == {"10000": 473, "100": 27}  # head dim 32
    assert {(r["base"], r["length"]) for r in data["perplexity"]} == {(1e4, 100), (1e2, 100)}
    assert all(len(r["by_depth"]) == 3 for r in data["passkey"])
    # the sliding-window cells score the (first 1000 tokens of the) evaluation split, each target once, up to a tail
    # shorter than one stride after the last window
    assert {(r["base"], r["length"]) for r in data["sliding"]} == {(1e4, 100), (1e2, 100)}
    assert all(1000 - 50 < r["n_tokens"] < 1000 and r["n_windows"] == 19 and math.isfinite(r["ppl"])
               for r in data["sliding"])
    # resuming keeps finished cells and runs only the new ones
    again = _run(tmp_path, "rope-retrieval", "--models", "zoo-rope", "--bases", "1e4,1e2", "--plan", "ppl:100,ppl:128",
                 "--resume", "--keys", "2", "--eval-tokens", "1000")
    assert len(again["perplexity"]) == 4 and again["passkey"] == data["passkey"] and again["sliding"] == data["sliding"]
    assert again["plan"] == ["perplexity:100", "sliding:100", "passkey:100", "perplexity:128"]
    with pytest.raises(ValueError, match="--resume: .* holds results for eval_tokens 1000, not 500"):
        findings.main(["rope-retrieval", "--models", "zoo-rope", "--plan", "ppl:100", "--resume", "--eval-tokens", "500",
                       "--out", str(tmp_path)])
    assert again["seconds"] >= data["seconds"]


def test_rope_retrieval_with_extension_methods(tmp_path):
    """Q1 at lengths past the trained window: each method's rows apply it at factor length / window on top of the base."""
    data = _run(tmp_path, "rope-retrieval", "--models", "zoo-rope", "--bases", "1e4", "--plan", "ppl:256,pk:256",
                "--methods", "none,dca,yarn", "--keys", "1", "--eval-tokens", "600")
    rows = {r["method"]: r for r in data["perplexity"]}
    assert set(rows) == {"none", "dca", "yarn"} and data["methods"] == ["none", "dca", "yarn"]
    assert rows["dca"]["settings"]["chunk_size"] == 96 and rows["yarn"]["settings"]["factor"] == 2.0  # window 128
    assert len({round(r["ppl"], 6) for r in rows.values()}) == 3  # three different models
    assert {r["method"] for r in data["passkey"]} == {"none", "dca", "yarn"}
    again = _run(tmp_path, "rope-retrieval", "--models", "zoo-rope", "--bases", "1e4", "--plan", "ppl:200",
                 "--methods", "dca", "--keys", "1", "--eval-tokens", "600", "--resume")
    assert again["methods"] == ["none", "dca", "yarn"] and len(again["perplexity"]) == 4  # earlier methods kept
    with pytest.raises(ValueError, match="--methods: unknown or unsupported method 'pv-replace'"):
        findings.main(["rope-retrieval", "--models", "zoo-rope", "--methods", "pv-replace", "--out", str(tmp_path / "x")])


def test_plan_and_anchor_helpers():
    assert findings.parse_plan("ppl:8,spl:8,pk:16") == [("perplexity", 8), ("sliding", 8), ("passkey", 16)]
    with pytest.raises(ValueError, match="--plan"):
        findings.parse_plan("ppl:8,passkey:16")
    # positions 0 and 1 have clusters of their own; position 2 shares its cluster with later ones
    assert findings.anchors(np.array([0, 1, 2, 2, 3]), first_k=3) == 2
    assert findings.by_kind([1, 3, 5], ["a", "b", "a"]) == {"a": 3.0, "b": 3.0}
