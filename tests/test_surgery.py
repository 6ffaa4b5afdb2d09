"""ShortGPT surgery: Block Influence against direct computations, removal against models built without the layers,
export loaded back by transformers, sub-layer removal, the CLI, and (real) the paper's claim on SmolLM2."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import transformers

from conftest import byte_tokenizer
from conftest import run_cli
from residscope.model import load_model
from residscope.surgery import (
    PRUNING_FILE,
    SUBLAYER_KEY,
    block_influence,
    block_influence_result,
    removal_order,
    remove_layers,
    remove_sublayers,
    save_pretrained,
)

VOCAB = 256
N_LAYERS = 6




def randomize(model, seed=1):
    """Random norm weights and larger residual contributions: scores then differ clearly between layers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif "o_proj" in name or "down_proj" in name:
                p.mul_(torch.rand((), generator=gen) * 8 + 1)


def make_hf(kind="llama", n_layers=N_LAYERS, seed=0, **kw):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, **kw)
    if kind == "qwen2":
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(use_sliding_window=True, sliding_window=5,
                                                                     max_window_layers=3, **common))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    randomize(hf, seed + 1)
    return hf.eval()


def save(hf, folder, tokenizer=True):
    hf.save_pretrained(folder)
    if tokenizer:
        byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = make_hf()
    folder = save(hf, tmp_path_factory.mktemp("surgery") / "ckpt")
    return hf, load_model(folder), folder


def ids_batch(b=4, p=24, seed=0):
    return torch.randint(0, VOCAB, (b, p), generator=torch.Generator().manual_seed(seed))


def cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=0.0)


# ---- Block Influence -----------------------------------------------------------------------------------------------
def test_scores_equal_direct_computation_from_cache(tiny):
    _, model, _ = tiny
    ids = ids_batch()
    _, cache = model.run_with_cache(ids)
    pre = [cache[f"blocks.{i}.hook_resid_pre"] for i in range(N_LAYERS)]
    mid = [cache[f"blocks.{i}.hook_resid_mid"] for i in range(N_LAYERS)]
    post = [cache[f"blocks.{i}.hook_resid_post"] for i in range(N_LAYERS)]
    expected = {
        "bi": [1 - cos(a, b).mean() for a, b in zip(pre, post)],
        "angular": [(torch.arccos(cos(a, b).clamp(-1, 1)) / math.pi).mean() for a, b in zip(pre, post)],
        "relative-magnitude": [((b - a).double().norm(dim=-1) / b.double().norm(dim=-1)).mean() for a, b in zip(pre, post)],
        "attn-bi": [1 - cos(a, b).mean() for a, b in zip(pre, mid)],
        "mlp-bi": [1 - cos(a, b).mean() for a, b in zip(mid, post)],
    }
    for metric, want in expected.items():
        got = block_influence(model, [ids], metric, progress=False)
        assert got.shape == (N_LAYERS,) and got.dtype == torch.float64
        torch.testing.assert_close(got, torch.stack(want), atol=1e-6, rtol=1e-5, msg=metric)
    # the scores really differ between layers, so the comparison above is not trivially satisfied
    assert abs(float(expected["bi"][0]) - float(expected["bi"][1])) > 1e-3


def test_streaming_batches_equal_one_batch(tiny):
    _, model, _ = tiny
    ids = ids_batch(b=6)
    one = block_influence_result(model, [ids], progress=False)
    many = block_influence_result(model, iter(ids.split(2)), progress=False)
    assert one.n_tokens == many.n_tokens == ids.numel()
    torch.testing.assert_close(many.scores, one.scores, atol=1e-9, rtol=0)
    torch.testing.assert_close(many.relative_magnitude, one.relative_magnitude, atol=1e-9, rtol=0)


def test_padding_is_excluded(tiny):
    _, model, _ = tiny
    a, b = ids_batch(1, 20, seed=5), ids_batch(1, 11, seed=6)
    separate = block_influence_result(model, [a, b], progress=False)
    ids = torch.cat((a, torch.cat((b, torch.zeros(1, 9, dtype=torch.long)), dim=1)))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    padded = block_influence_result(model, [(ids, mask)], progress=False)
    assert padded.n_tokens == separate.n_tokens == 31
    torch.testing.assert_close(padded.scores, separate.scores, atol=1e-6, rtol=0)


def test_shortgpt_compat_matches_reference_on_hidden_states(tiny):
    """The reference code: hidden_states from transformers, 1 - cos with NaN -> 0.5; differs only in the last layer."""
    hf, model, _ = tiny
    ids = ids_batch()
    with torch.no_grad():
        hs = hf(ids, output_hidden_states=True).hidden_states  # L + 1 entries, the last one after the final norm
    d = hs[0].shape[-1]
    ref = []
    for i in range(N_LAYERS):
        a, b = hs[i].reshape(-1, d).double(), hs[i + 1].reshape(-1, d).double()
        sim = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        ref.append((1 - sim.nan_to_num(nan=0.5)).mean())
    compat = block_influence(model, [ids], shortgpt_compat=True, progress=False)
    exact = block_influence(model, [ids], progress=False)
    torch.testing.assert_close(compat, torch.stack(ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compat[:-1], exact[:-1], atol=0, rtol=0)
    assert abs(compat[-1] - exact[-1]) > 1e-3


def test_undefined_cosines_skipped_by_default_and_half_in_compat(tiny):
    """A zero residual vector (token 7's embedding zeroed) has no cosine: skipped exactly, 0.5 in compat mode."""
    _, model, _ = tiny
    ids = ids_batch(2, 10, seed=7)
    ids[0, 3] = 7
    ids[ids != 7] = ids[ids != 7].clamp(min=8)
    saved = model.embed.weight[7].clone()
    with torch.no_grad():
        model.embed.weight[7] = 0
    try:
        exact = block_influence_result(model, [ids], progress=False)
        compat = block_influence_result(model, [ids], shortgpt_compat=True, progress=False)
        _, cache = model.run_with_cache(ids)
    finally:
        with torch.no_grad():
            model.embed.weight[7] = saved
    c = cos(cache["blocks.0.hook_resid_pre"], cache["blocks.0.hook_resid_post"]).reshape(-1)  # [20], one NaN
    assert int(torch.isnan(c).sum()) == 1 and exact.undefined_tokens[0] == 1 and exact.undefined_tokens[1] == 0
    assert exact.scores[0].item() == pytest.approx(1 - c[~torch.isnan(c)].mean().item(), abs=1e-6)
    assert compat.scores[0].item() == pytest.approx(1 - c.nan_to_num(nan=0.5).mean().item(), abs=1e-6)


def test_removal_order_and_baselines():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.1, 0.3])
    assert removal_order(scores, 3) == [1, 3, 4]  # smallest first, ties by index
    assert removal_order([0.2, 0.1], 0) == []
    assert removal_order("sequential", 2, n_layers=5) == [0, 1]  # from the bottom: the input end of the stack
    assert removal_order("reverse", 2, n_layers=5) == [4, 3]  # from the top
    r0 = removal_order("random", 3, n_layers=10, seed=0)
    assert r0 == removal_order("random", 3, n_layers=10, seed=0) and len(set(r0)) == 3
    assert any(removal_order("random", 3, n_layers=10, seed=s) != r0 for s in range(1, 5))
    with pytest.raises(ValueError, match="baseline"):
        removal_order("backwards", 2, n_layers=5)
    with pytest.raises(ValueError, match="cannot remove 6 of 5"):
        removal_order(scores, 6)
    with pytest.raises(ValueError, match="n_layers"):
        removal_order("reverse", 2)


# ---- removal and export ----------------------------------------------------------------------------------------------
def hf_without(hf, removed, kind="llama"):
    """A transformers model built with fewer layers, holding the kept layers' weights."""
    keep = [i for i in range(hf.config.num_hidden_layers) if i not in removed]
    cfg = hf.config.to_dict()
    cfg["num_hidden_layers"] = len(keep)
    if cfg.get("layer_types"):
        cfg["layer_types"] = [cfg["layer_types"][i] for i in keep]
    config = type(hf.config).from_dict(cfg)
    small = type(hf)(config).eval()
    small.model.embed_tokens.load_state_dict(hf.model.embed_tokens.state_dict())
    small.model.norm.load_state_dict(hf.model.norm.state_dict())
    small.lm_head.load_state_dict(hf.lm_head.state_dict())
    for new, old in enumerate(keep):
        small.model.layers[new].load_state_dict(hf.model.layers[old].state_dict())
    return small


def test_remove_layers_equals_model_built_without_them(tiny, tmp_path):
    hf, model, _ = tiny
    ids = ids_batch()
    before = model(ids)
    pruned = remove_layers(model, [3, 1])
    torch.testing.assert_close(model(ids), before, atol=0, rtol=0)  # the original is untouched (deep copy)
    assert len(model.blocks) == N_LAYERS and pruned.cfg.n_layers == len(pruned.blocks) == 4
    assert pruned.attention_layers() == [0, 1, 2, 3] and pruned.layer_origin == [0, 2, 4, 5]
    assert "blocks.3.hook_resid_post" in pruned.hook_dict and "blocks.4.hook_resid_post" not in pruned.hook_dict
    assert pruned.tokenizer is model.tokenizer
    reference = load_model(save(hf_without(hf, [1, 3]), tmp_path / "built", tokenizer=False), load_tokenizer=False)
    torch.testing.assert_close(pruned(ids), reference(ids), atol=0, rtol=0)
    # composes: removing original layer 4 from the pruned model (now index 2)
    twice = remove_layers(pruned, [2])
    assert twice.layer_origin == [0, 2, 5] and twice.n_layers_original == N_LAYERS


def test_export_loads_in_transformers_with_equal_logits(tiny, tmp_path):
    _, model, _ = tiny
    ids = ids_batch()
    order = removal_order(block_influence(model, [ids], progress=False), 2)
    pruned = remove_layers(model, order)
    out = save_pretrained(pruned, tmp_path / "pruned", pruning_info={"metric": "bi", "removed_layers": order})
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == N_LAYERS - 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(load_model(out)(ids), pruned(ids), atol=0, rtol=0)
    info = json.loads((out / PRUNING_FILE).read_text())
    assert info["removed_layers"] == order and info["n_layers_before"] == N_LAYERS and info["n_layers_after"] == 4
    assert set(info["versions"]) == {"residscope", "torch", "transformers"}
    assert transformers.AutoTokenizer.from_pretrained(out)("ab")["input_ids"] == [64, 65]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no temporary folder left behind


def test_export_keeps_per_layer_types_of_sliding_window_models(tmp_path):
    """Qwen2 derives layer types from max_window_layers; after removal they must be written out explicitly."""
    hf = make_hf("qwen2", tie_word_embeddings=True)
    model = load_model(save(hf, tmp_path / "qwen", tokenizer=False), load_tokenizer=False)
    assert model.cfg.layer_types[2:] != model.cfg.layer_types[:2]
    ids = ids_batch(2, 16)
    pruned = remove_layers(model, [0, 4])
    assert pruned.cfg.layer_types == [model.cfg.layer_types[i] for i in (1, 2, 3, 5)]
    torch.testing.assert_close(pruned(ids), hf_to_logits(hf_without(hf, [0, 4]), ids), atol=1e-5, rtol=1e-5)
    out = save_pretrained(pruned, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.layer_types == pruned.cfg.layer_types
    torch.testing.assert_close(hf_to_logits(reloaded, ids), pruned(ids), atol=1e-5, rtol=1e-5)


def hf_to_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


def test_export_refuses_a_non_empty_target_unless_forced(tiny, tmp_path):
    _, model, _ = tiny
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    pruned = remove_layers(model, [0])
    with pytest.raises(ValueError, match=r"^out: .*not empty"):
        save_pretrained(pruned, target)
    assert (target / "keep.txt").read_text() == "mine"
    save_pretrained(pruned, target, force=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sublayer_removal(tiny, tmp_path):
    """Removing the last layer's attention (or MLP) equals zeroing that half's output; saved in residscope's format."""
    _, model, _ = tiny
    ids = ids_batch()
    last = N_LAYERS - 1
    no_attn = remove_sublayers(model, attn=[last])
    no_mlp = remove_sublayers(model, mlp=[last])
    zero = lambda x, hook: torch.zeros_like(x)  # noqa: E731
    torch.testing.assert_close(no_attn(ids), model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{last}.hook_attn_out", zero)]))
    torch.testing.assert_close(no_mlp(ids), model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{last}.hook_mlp_out", zero)]))
    assert model.blocks[last].attn is not None and no_attn.blocks[last].attn is None
    assert f"blocks.{last}.attn.hook_q" not in no_attn.hook_dict
    # attention-only score of a removed half is zero: the stream passes through unchanged
    assert block_influence(no_attn, [ids], "attn-bi", progress=False)[last] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="attn: layer 5 has no attn"):
        remove_sublayers(no_attn, attn=[last])

    with pytest.warns(UserWarning, match="residscope's own format"):
        out = save_pretrained(no_attn, tmp_path / "sub")
    config = json.loads((out / "config.json").read_text())
    assert config[SUBLAYER_KEY] == {"attn": [last], "mlp": []}
    assert json.loads((out / PRUNING_FILE).read_text())[SUBLAYER_KEY] == {"attn": [last], "mlp": []}
    # load_model reads the recorded halves back: same model, same logits
    rebuilt = load_model(out)
    assert rebuilt.blocks[last].attn is None and rebuilt.blocks[last].mlp is not None
    torch.testing.assert_close(rebuilt(ids), no_attn(ids), atol=0, rtol=0)


def test_errors_name_the_argument(tiny, tmp_path):
    _, model, _ = tiny
    with pytest.raises(ValueError, match=r"^layers: layer 6 out of range"):
        remove_layers(model, [6])
    with pytest.raises(ValueError, match=r"^layers: layer -1 out of range"):
        remove_layers(model, [-1])
    with pytest.raises(ValueError, match=r"^layers: layer 2 given twice"):
        remove_layers(model, [2, 2])
    with pytest.raises(ValueError, match=r"^layers: cannot remove all"):
        remove_layers(model, range(N_LAYERS))
    with pytest.raises(ValueError, match=r"^metric must be one of"):
        block_influence(model, [ids_batch()], "cosine", progress=False)


# ---- CLI -----------------------------------------------------------------------------------------------------------
CALIB = ["--seq-len", "32", "--samples", "4", "--batch-size", "2"]


def test_cli_bi_ppl_and_prune(tiny, tmp_path, capsys):
    _, model, folder = tiny
    code, out, err = run_cli(["bi", "--model", str(folder), *CALIB, "--json", "--html", str(tmp_path / "bi.html")], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert len(result["scores"]) == N_LAYERS and result["metric"] == "bi" and "calibration" in result["source"]
    assert (tmp_path / "bi.html").read_text().count("plotly") > 0

    code, out, err = run_cli(["bi", "--model", str(folder), *CALIB, "--metric", "mlp-bi"], capsys)
    assert code == 0 and "mlp-bi per layer" in out and out.count("\n") >= N_LAYERS + 2

    code, out, err = run_cli(["prune", "--model", str(folder), "--remove", "2", "--out", str(tmp_path / "p"), *CALIB,
                              "--eval-samples", "4", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    expected = removal_order(block_influence_result(model, _calibration(model), progress=False), 2)
    assert report["removed_layers"] == expected and report["metric"] == "bi"
    info = json.loads((tmp_path / "p" / PRUNING_FILE).read_text())
    assert info["removed_layers"] == expected and len(info["scores"]) == N_LAYERS
    assert info["perplexity"]["after"]["ppl"] == pytest.approx(report["after"]["ppl"])
    assert transformers.AutoConfig.from_pretrained(tmp_path / "p").num_hidden_layers == N_LAYERS - 2

    code, out, err = run_cli(["ppl", "--model", str(tmp_path / "p"), "--seq-len", "32", "--samples", "4", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["ppl"] == pytest.approx(report["after"]["ppl"], rel=1e-6)

    code, out, err = run_cli(["prune", "--model", str(folder), "--remove", "2", "--compare", "--seeds", "2", *CALIB,
                              "--eval-samples", "2"], capsys)
    assert code == 0, err
    for method in ("bi", "angular", "relative-magnitude", "attn-bi", "mlp-bi", "sequential", "reverse", "random (mean of 2)"):
        assert method in out


def _calibration(model):
    from residscope.analyses.corpus import calibration_batches

    return calibration_batches(model, seq_len=32, samples=4, batch_size=2)[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune", "--remove", "2", "--layers", "1"], "exactly one"),
        (["prune", "--layers", "1,x", "--out", "OUT"], "--layers: expected comma-separated"),
        (["prune", "--layers", "9", "--out", "OUT"], "--layers: layer 9 out of range"),
        (["prune", "--remove", "6", "--out", "OUT"], "--remove must be between 1 and 5"),
        (["prune", "--remove", "2"], "--out is required"),
        (["prune", "--remove", "2", "--metric", "cosine", "--out", "OUT"], "--metric must be one of"),
        (["prune", "--remove", "2", "--out", "FULL"], "out: "),
        (["bi", "--metric", "cosine"], "metric must be one of"),
        (["ppl", "--text", "missing.txt"], "missing.txt"),
    ],
)
def test_cli_errors_are_one_line(tiny, tmp_path, capsys, argv, message):
    _, _, folder = tiny
    (tmp_path / "FULL").mkdir()
    (tmp_path / "FULL" / "x").write_text("x")
    argv = [str(tmp_path / a) if a in ("OUT", "FULL", "missing.txt") else a for a in argv]
    code, out, err = run_cli([argv[0], "--model", str(folder), *argv[1:]], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("residscope: error:") and message in lines[0], err
    assert not (tmp_path / "OUT").exists()


# ---- the paper's claim on the bundled model --------------------------------------------------------------------------
@pytest.mark.real
def test_lowest_bi_removal_beats_random_and_sequential(real_model):
    from residscope.analyses.corpus import calibration_batches
    from residscope.analyses.perplexity import heldout_perplexity

    model = real_model
    n_layers = model.cfg.n_layers
    n = n_layers // 4
    batches, source = calibration_batches(model, seq_len=128, samples=4, batch_size=4)
    scores = block_influence_result(model, batches, progress=False, source=source).scores

    def ppl(order):
        pruned = remove_layers(model, order)
        return heldout_perplexity(pruned, seq_len=128, samples=4, batch_size=4, progress=False).ppl

    dense = heldout_perplexity(model, seq_len=128, samples=4, batch_size=4, progress=False).ppl
    by_bi = ppl(removal_order(scores, n))
    sequential = ppl(removal_order("sequential", n, n_layers=n_layers))
    random = statistics.fmean(ppl(removal_order("random", n, n_layers=n_layers, seed=s)) for s in range(3))
    print(f"\nSmolLM2 BI {[round(s, 4) for s in scores.tolist()]}\nremove {n}: dense {dense:.2f}, lowest-BI {by_bi:.2f}"
          f" ({removal_order(scores, n)}), random mean {random:.2f}, sequential {sequential:.2f}")
    assert dense < by_bi
    assert by_bi < 0.5 * random and by_bi < 0.5 * sequential
