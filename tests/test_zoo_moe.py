"""zoo-moe: the small Qwen2-MoE trained here (model/zoo/moe, `python -m residscope.analyses.zoo_train --name zoo-moe`),
so routing analyses and expert pruning have real structure to find. Its figures are pinned (measured once on this
machine, float32 CPU; a changed number means the model, the data split or the forward changed)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from residscope.analyses.corpus import calibration_batches
from residscope.analyses.experts import routing_statistics
from residscope.analyses.perplexity import heldout_perplexity, perplexity
from residscope.model import load_model
from residscope.model.registry import resolve_source
from residscope.surgery.experts import prune_experts

PINNED_PPL = 134.608  # held-out perplexity, 16 x 128 tokens of the evaluation split, seed 0
PINNED_IMBALANCE = [1.15448, 1.06511, 1.05219, 1.13946]  # per layer, E * sum f * P over 16 x 128 calibration tokens


@pytest.fixture(scope="module")
def zoo():
    return load_model("zoo-moe")


@pytest.fixture(scope="module")
def stats(zoo):
    batches, _ = calibration_batches(zoo, seq_len=128, samples=16, batch_size=8)
    return batches, routing_statistics(zoo, batches, progress=False)


def test_zoo_moe_is_a_qwen2_moe(zoo):
    cfg = zoo.cfg
    assert cfg.model_type == "qwen2_moe" and cfg.num_experts == 8 and cfg.experts_per_token == 2
    assert cfg.sparse_layers == (0, 1, 2, 3) and cfg.d_shared_expert == 128 and not cfg.norm_topk_prob
    info = json.loads((resolve_source("zoo-moe") / "residscope_zoo.json").read_text())
    assert info["name"] == "zoo-moe" and info["command"].startswith("python -m residscope.analyses.zoo_train")


def test_zoo_moe_held_out_perplexity_is_pinned(zoo):
    r = heldout_perplexity(zoo, seq_len=128, samples=16, batch_size=8, progress=False)
    assert r.ppl == pytest.approx(PINNED_PPL, rel=1e-3)


def test_zoo_moe_routing_is_balanced_and_specialised(zoo, stats):
    _, st = stats
    assert st.imbalance.tolist() == pytest.approx(PINNED_IMBALANCE, rel=1e-3)
    # the load-balancing loss kept every expert busy; the router is not uniform per token (entropy below log 8)
    assert (st.load > 0.02).all()
    assert (st.entropy < math.log(8) - 0.15).all()
    # routing depends on token identity: an expert's ten most frequent tokens cover more of its tokens than the ten most
    # frequent tokens of the corpus cover of all tokens
    batches, _ = stats
    ids = torch.cat(batches).reshape(-1)
    corpus_top10 = float(ids.bincount().sort(descending=True).values[:10].sum() / ids.numel())
    expert_top10 = torch.tensor([[sum(s for _, s in toks[:10]) for toks in layer] for layer in st.top_tokens])
    assert float(expert_top10.mean()) > corpus_top10


def test_zoo_moe_salient_experts_matter_more(zoo, stats):
    """Keeping the 6 most salient experts (REAP) costs less perplexity than keeping the 6 least salient."""
    batches, st = stats
    evals, _ = calibration_batches(zoo, seq_len=128, samples=8, batch_size=8, split="evaluation")
    order = st.rank("reap").argsort(dim=-1, descending=True)  # [layer, expert], most salient first
    best = {i: sorted(order[r, :6].tolist()) for r, i in enumerate(st.layers)}
    worst = {i: sorted(order[r, -6:].tolist()) for r, i in enumerate(st.layers)}
    dense = perplexity(zoo, evals, progress=False).ppl
    kept_best = perplexity(prune_experts(zoo, best), evals, progress=False).ppl
    kept_worst = perplexity(prune_experts(zoo, worst), evals, progress=False).ppl
    assert dense < kept_best < kept_worst
