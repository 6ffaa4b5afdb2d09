"""Pruning criteria behind `select_layers`: every criterion gives a valid order; angular-block, one-shot perplexity,
forked sub-block removal, SLEB and Taylor against direct computations; streamed (offloaded) runs equal in-memory ones;
`prune --metric/--compare` on the CLI; bad input in one line. (Sharded runs: tests/test_distributed.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from residscope.analyses.perplexity import perplexity
from residscope.model import load_model
from residscope.runtime.forks import Fork
from residscope.surgery import CRITERIA, remove_layers, remove_sublayers, select_layers, selection
from residscope.surgery.criteria import (angular_distances, blockprune_order, fork_nll, half_params, one_shot_ppl,
                                         sleb_order, taylor_scores)
from conftest import run_cli
from test_surgery import VOCAB, make_hf, save

N_LAYERS = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save(make_hf(n_layers=N_LAYERS, seed=3), tmp_path_factory.mktemp("criteria") / "ckpt")
    return load_model(folder, dtype=torch.float64), folder


def batches(n=2, b=2, p=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randint(0, VOCAB, (b, p), generator=gen) for _ in range(n)]
    mask = torch.ones_like(out[0])
    mask[0, :3] = 0  # left padding in one row: the last real token and the perplexity must follow the mask
    return [(out[0], mask), *out[1:]]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_returns_a_valid_order(tiny, criterion):
    model, _ = tiny
    order = select_layers(model, batches(), 2, criterion, progress=False)
    if criterion == "blockprune":
        assert all(part in ("attn", "mlp") and 0 <= i < N_LAYERS for i, part in order)
        assert len(set(order)) == len(order)
        removed = sum(half_params(model, i, part) for i, part in order)
        budget = 2 * sum(half_params(model, i, p) for i in range(N_LAYERS) for p in ("attn", "mlp")) / N_LAYERS
        assert removed >= budget and removed - max(half_params(model, i, p) for i, p in order) < budget
    else:
        assert len(order) == 2 and len(set(order)) == 2 and all(0 <= i < N_LAYERS for i in order)
    if criterion == "angular-block":
        assert order[1] == order[0] + 1


def test_angular_block_equals_brute_force(tiny):
    model, _ = tiny
    data = batches()
    for n in (1, 2, N_LAYERS):
        dist, rows = angular_distances(model, data, n, progress=False)
        expected = torch.zeros(N_LAYERS - n + 1, dtype=torch.float64)
        for ids, mask in [d if isinstance(d, tuple) else (d, None) for d in data]:
            _, cache = model.run_with_cache(ids, attention_mask=mask)
            streams = [cache[f"blocks.{i}.hook_resid_pre"] for i in range(N_LAYERS)]
            streams.append(cache[f"blocks.{N_LAYERS - 1}.hook_resid_post"])
            for row in range(ids.shape[0]):
                last = int(mask[row].nonzero().max()) if mask is not None else ids.shape[1] - 1
                for start in range(N_LAYERS - n + 1):
                    a, b = streams[start][row, last], streams[start + n][row, last]
                    expected[start] += math.acos(max(-1.0, min(1.0, float(F.cosine_similarity(a, b, dim=0))))) / math.pi
        torch.testing.assert_close(dist, expected / 4, rtol=1e-10, atol=1e-12)
        assert rows == 4
    chosen = selection(model, data, 2, "angular-block", progress=False)
    best = min(range(N_LAYERS - 1), key=lambda s: (chosen.scores[s], s))
    assert chosen.order == [best, best + 1]


def test_one_shot_ppl_equals_perplexity_of_each_removed_model(tiny):
    model, _ = tiny
    data = batches()
    ppl = one_shot_ppl(model, data, 1, progress=False).scores
    direct = [perplexity(remove_layers(model, [j]), data, progress=False).ppl for j in range(N_LAYERS)]
    torch.testing.assert_close(torch.tensor(ppl), torch.tensor(direct), rtol=1e-10, atol=0)


def test_forked_halves_equal_sublayer_removal(tiny):
    """A fork without attention / MLP of block k, on a model already missing other parts, equals remove_sublayers."""
    model, _ = tiny
    data = batches()
    removed = [Fork(1), Fork(3, "mlp")]
    forks = [Fork(0, "attn"), Fork(2, "mlp"), Fork(3, "attn"), Fork(4)]
    sums, n_tokens = fork_nll(model, data, forks, removed=removed, progress=False)
    for fork, total in zip(forks, sums):
        attn = [f.layer for f in [fork] if f.part == "attn"]
        mlp = [3] + [f.layer for f in [fork] if f.part == "mlp"]
        pruned = remove_sublayers(model, attn=attn, mlp=mlp)
        drop = [1] + ([fork.layer] if fork.part == "block" else [])
        r = perplexity(remove_layers(pruned, drop), data, progress=False)
        assert total / n_tokens == pytest.approx(r.nll, rel=1e-10) and n_tokens == r.n_tokens


def test_sleb_fast_greedy_equals_naive_greedy(tiny):
    model, _ = tiny
    data = batches()
    fast = sleb_order(model, data, 3, progress=False)
    naive = sleb_order(model, data, 3, progress=False, naive=True)
    assert fast.order == naive.order
    for a, b in zip(fast.steps, naive.steps):
        assert a["candidates"].keys() == b["candidates"].keys()
        for key in a["candidates"]:
            assert a["candidates"][key] == pytest.approx(b["candidates"][key], rel=1e-10)
    # the first step is the one-shot criterion
    assert fast.steps[0]["removed"] == one_shot_ppl(model, data, 1, progress=False).order[0]


def test_blockprune_first_step_scores_every_half(tiny):
    model, _ = tiny
    data = batches()
    chosen = blockprune_order(model, data, 1, progress=False)
    first = chosen.steps[0]["candidates"]
    assert len(first) == 2 * N_LAYERS
    i, part = chosen.order[0]
    direct = perplexity(remove_sublayers(model, **{part: [i]}), data, progress=False).ppl
    assert first[f"{i}.{part}"] == pytest.approx(direct, rel=1e-10) == min(first.values())


def test_taylor_equals_hand_autograd(tiny):
    model, _ = tiny
    data = batches()
    scores, n_tokens = taylor_scores(model, data, progress=False)
    weights = [[p for name, p in block.named_parameters() if name.endswith("weight")] for block in model.blocks]
    flat = [p for w in weights for p in w]
    total, count = 0.0, 0
    for ids, mask in [d if isinstance(d, tuple) else (d, None) for d in data]:
        logits = model(ids, attention_mask=mask)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
        keep = torch.ones_like(nll, dtype=torch.bool) if mask is None else (mask[:, 1:].bool() & mask[:, :-1].bool()).reshape(-1)
        total = total + nll[keep].sum()
        count += int(keep.sum())
    grads = torch.autograd.grad(total / count, flat)
    expected, k = [], 0
    for w in weights:
        expected.append(sum(float((g * p).abs().sum()) for g, p in zip(grads[k:k + len(w)], w)))
        k += len(w)
    assert n_tokens == count
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=0)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # left as it was


def test_offloaded_model_gives_the_same_choices(tiny):
    model, folder = tiny
    streamed = load_model(folder, dtype=torch.float64, offload=True)
    data = batches()
    for criterion in ("ppl", "angular-block", "sleb", "blockprune"):
        a = selection(model, data, 2, criterion, progress=False)
        b = selection(streamed, data, 2, criterion, progress=False)
        assert a.order == b.order, criterion
        assert a.scores == pytest.approx(b.scores, rel=1e-10) if a.scores else a.steps[-1]["ppl"] == pytest.approx(
            b.steps[-1]["ppl"], rel=1e-10)
    with pytest.raises(ValueError, match=r"^criterion taylor needs every block's weights .* --offload"):
        select_layers(streamed, data, 1, "taylor", progress=False)


def test_bad_input_is_one_line(tiny):
    model, _ = tiny
    data = batches()
    with pytest.raises(ValueError, match=r"^n must be between 1 and 4 for this 5-layer model; got 5$"):
        select_layers(model, data, N_LAYERS, "bi", progress=False)
    with pytest.raises(ValueError, match=r"^n: angular-block needs 6 consecutive blocks but the model has only 5"):
        select_layers(model, data, 6, "angular-block", progress=False)
    with pytest.raises(ValueError, match=r"^criterion must be one of"):
        select_layers(model, data, 1, "cosine", progress=False)


CALIB = ["--seq-len", "16", "--samples", "2", "--batch-size", "2", "--eval-samples", "2"]


def test_cli_prune_by_a_new_criterion_and_compare_with_stability(tiny, tmp_path, capsys):
    _, folder = tiny
    code, out, err = run_cli(["prune", "--model", str(folder), "--remove", "2", "--metric", "sleb", "--out",
                              str(tmp_path / "p"), *CALIB, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["metric"] == "sleb" and len(report["removed_layers"]) == 2
    info = json.loads((tmp_path / "p" / "residscope_pruning.json").read_text())
    assert [s["removed"] for s in info["steps"]] == report["removed_layers"]

    code, out, err = run_cli(["prune", "--model", str(folder), "--remove", "1", "--compare", "--criteria",
                              "bi,angular-block,ppl,blockprune,reverse", *CALIB, "--json"], capsys)
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads(out)["compare"]["rows"]}
    assert set(rows) == {"bi", "angular-block", "ppl", "blockprune", "reverse"}
    for name in ("bi", "angular-block", "ppl", "blockprune"):
        assert 0.0 <= rows[name]["overlap"] <= 1.0 and rows[name]["removed_b"] is not None
    assert rows["bi"]["rank_correlation"] is not None and rows["reverse"]["overlap"] is None
    code, out, err = run_cli(["prune", "--model", str(folder), "--remove", "1", "--compare", "--criteria", "bi,ppl",
                              *CALIB], capsys)
    assert code == 0 and "overlap" in out and "rank corr" in out and out.count("\n") >= 4


@pytest.mark.parametrize("argv, message", [
    (["prune", "--remove", "5", "--out", "OUT"], "--remove must be between 1 and 4"),
    (["prune", "--remove", "6", "--metric", "angular-block", "--out", "OUT"], "--remove: angular-block needs 6"),
    (["prune", "--remove", "1", "--metric", "nope", "--out", "OUT"], "--metric must be one of"),
    (["prune", "--remove", "1", "--compare", "--criteria", "bi,nope"], "--criteria: unknown 'nope'"),
    (["prune", "--remove", "1", "--metric", "taylor", "--offload", "--out", "OUT"], "criterion taylor needs"),
])
def test_cli_bad_input_is_one_line(tiny, tmp_path, capsys, argv, message):
    _, folder = tiny
    argv = [str(tmp_path / a) if a == "OUT" else a for a in argv]
    code, out, err = run_cli([argv[0], "--model", str(folder), *argv[1:], *CALIB], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "OUT").exists()
