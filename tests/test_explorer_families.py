"""Every explorer page on a tiny random checkpoint of each non-Llama kind: learned positions and LayerNorm (gpt2),
partial rotary and parallel blocks (gpt_neox), ALiBi (bloom), NoPE layers (smollm3), soft-capping and sliding layers
(gemma2), mixture of experts (qwen2_moe). No page may raise or show an error, and each must show what is true of the
family: the RoPE page on a model without rotary positions says so, a learned position table caps every length the pages
offer (GPT-2 has no position 65 to run), the rotated dimensions of a partial-rotary head, the NoPE layers, the experts.

The whole matrix (48 page runs, about two minutes on 2 busy cores) is marked slow; the runs where a family differs
from Llama in what a page must do run in the default suite."""

from __future__ import annotations

import pytest

from family_zoo import CASES, randomize
from test_explorer import assert_clean, chart_spec, metrics, run_app
from tiny_llama import tiny_tokenizer

FAMILIES = ("gpt2", "gpt_neox", "bloom", "smollm3", "gemma2", "qwen2_moe")
PAGES = ("tokens", "attention", "residual", "rope", "pruning", "extension", "ruler", "experts")
FAST = {("gpt2", "residual"), ("gpt2", "ruler"), ("bloom", "rope"), ("smollm3", "rope")}
LEARNED = {"gpt2": 64}  # family -> size of its learned position table in the test case


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> folder: the family's test case with the tiny BPE's vocabulary, saved with that tokenizer."""
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    folders: dict[str, str] = {}

    def make(family: str) -> str:
        if family not in folders:
            config = CASES[family]().config
            config.vocab_size, config.bos_token_id, config.eos_token_id = len(tokenizer), eos, eos
            config.pad_token_id = None
            model = randomize(type(CASES[family]())(config))
            folder = tmp_path_factory.mktemp(family) / "ckpt"
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            folders[family] = str(folder)
        return folders[family]

    return make


def n_layers(family: str) -> int:
    return CASES[family]().config.num_hidden_layers


def texts(elements) -> str:
    return " | ".join(e.value for e in elements)


def check_page(at, family: str, page: str) -> None:
    """What each page must show on this family."""
    m = metrics(at)
    limit = LEARNED.get(family)
    if page == "tokens":
        lens = chart_spec(at, "logit_lens")["data"][0]
        assert len(lens["text"]) == n_layers(family) and int(m["Prompt tokens"]) > 1
    elif page == "attention":
        sinks = [float(v) for k, v in m.items() if k.startswith("Sink mass")]
        assert len(sinks) == 3 and all(0 <= v <= 1 for v in sinks)
        assert ("64 learned positions" in texts(at.info)) == (limit is not None)
    elif page == "residual":
        assert m["Samples x tokens"] == f"8 x {min(128, limit or 128)}"  # capped at the learned positions
        assert len(at.get("plotly_chart")) == 5
    elif page == "rope":
        rotary = family not in ("gpt2", "bloom")
        assert ("has no rotary positions" in texts(at.info)) == (not rotary)
        if rotary:
            rows = at.dataframe[0].value
            assert list(rows["rotary dim"]) == [{"gpt_neox": 4}.get(family, 16)] * len(rows)  # rotary_pct 0.25 of 16
            assert ("Layers [1, 3] apply no rotary position" in texts(at.caption)) == (family == "smollm3")
            if family == "gemma2":
                assert list(rows["window"].dropna()) == [6]  # its sliding layers; the global ones have none
    elif page == "pruning":
        assert at.multiselect[0].value and chart_spec(at, "influence")
    elif page == "extension":
        assert "Trained window W = " in texts(at.caption)
        assert ("learned table of 64" in texts(at.info)) == (limit is not None)
    elif page == "ruler":
        sample = texts(at.caption)
        if limit is not None:  # no RULER prompt fits in 64 positions: the preview says so, as a warning
            assert "too short" in texts(at.warning) and "learned table of 64" in texts(at.info)
        else:
            assert "to generate; references:" in sample
    elif page == "experts":
        if family == "qwen2_moe":
            assert m["Experts"] == "2 of 6 per token" and len(at.get("plotly_chart")) == 4
        else:
            assert "no mixture-of-experts layers" in texts(at.info)


@pytest.mark.parametrize("family, page", [
    pytest.param(f, p, marks=() if (f, p) in FAST else pytest.mark.slow) for f in FAMILIES for p in PAGES])
def test_page_on_the_family(checkpoint, family, page):
    at = run_app(checkpoint(family), page)
    assert_clean(at)
    assert at.header[0].value and f"{family}:" in texts(at.sidebar.caption)
    check_page(at, family, page)
