"""The zoo: small models trained here that differ only in their positional scheme (model/zoo/<name>/, zoo_train.py).

Fast checks that the shipped checkpoints load with their documented configs and tokenizer and predict in-window text
well; the training code saves what it loads. The extension claims measured on the zoo are in the `slow` tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from residscope.model import load_model
from residscope.model import zoo_train
from residscope.model.registry import ZOO_DIR, resolve_source

# name -> (positional scheme, rope theta or None, sliding window or None)
DOCUMENTED = {
    "nope": ("none", None, None),
    "rope": ("rope", 10000.0, None),
    "rope-smallbase": ("rope", 20.0, None),
    "alibi": ("alibi", None, None),
    "window": ("none", None, 32),
}


@pytest.fixture(scope="module", params=list(DOCUMENTED))
def zoo_model(request):
    return request.param, load_model(f"zoo-{request.param}")


def test_zoo_checkpoints_load_with_their_documented_config(zoo_model):
    name, model = zoo_model
    positional, theta, window = DOCUMENTED[name]
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab) == (4, 128, 4, 32, 384, 2048)
    assert cfg.max_position_embeddings == zoo_train.TRAIN_WINDOW == 128
    assert cfg.positional == positional and cfg.tie_embeddings
    assert cfg.model_type == ("mistral" if window else "llama")
    assert [cfg.window_of(i) for i in range(cfg.n_layers)] == [window] * cfg.n_layers
    if theta is None:
        assert cfg.rope == {}
    else:
        assert {p.theta for p in cfg.rope.values()} == {theta} and {p.rope_type for p in cfg.rope.values()} == {"default"}
    info = json.loads((ZOO_DIR / name / "residscope_zoo.json").read_text())
    assert info["name"] == f"zoo-{name}" and info["seed"] == zoo_train.SEED and info["steps"] >= 100
    assert info["command"].startswith("python -m residscope.model.zoo_train") and info["final_loss"] < 4.0
    assert resolve_source(f"zoo-{name}") == ZOO_DIR / name


def test_zoo_models_share_one_tokenizer_that_splits_digits():
    texts = {(ZOO_DIR / n / "tokenizer.json").read_text() for n in DOCUMENTED}
    assert len(texts) == 1
    model = load_model("zoo-rope")
    tok = model.tokenizer
    ids = tok("The pass key is 40719.")["input_ids"]
    assert ids[0] == tok.bos_token_id == model.cfg.bos_token_id
    assert [tok.decode([i]) for i in ids[-6:-1]] == list("40719")
    assert tok.decode(ids, skip_special_tokens=True) == "The pass key is 40719."


def test_zoo_models_predict_held_out_text_within_their_window(zoo_model):
    from residscope.analyses.extension import evaluation_tokens, sliding_window_perplexity

    name, model = zoo_model
    tokens = evaluation_tokens(model, 2048)
    ppl, *_ = sliding_window_perplexity(model, tokens, 128, stride=127, bos=model.tokenizer.bos_token_id, progress=False)
    # held-out topics, 500 steps of 8 x 128 tokens: about 55-85; a uniform guess over 2048 tokens scores 2048
    assert ppl < 150, f"zoo-{name}: in-window perplexity {ppl:.1f}"


def test_small_base_is_below_and_rope_base_above_the_bound_for_the_window():
    from residscope.analyses.rope_bound import context_bound

    d = zoo_train.SPECS["rope"].d_head
    assert context_bound(zoo_train.SPECS["rope"].rope_theta, d).bound >= zoo_train.TRAIN_WINDOW
    assert context_bound(zoo_train.SPECS["rope-smallbase"].rope_theta, d).bound < zoo_train.TRAIN_WINDOW // 4


def test_training_saves_what_load_model_reads(tmp_path):
    spec = zoo_train.ZooSpec("tiny", "alibi", n_layers=1, d_model=32, n_heads=2, d_mlp=48, vocab_size=300, window=32)
    tok = zoo_train.train_tokenizer(zoo_train.tokenizer_text()[:20000], spec.vocab_size)
    model, info = zoo_train.train(spec, tok, zoo_train.TrainSettings(steps=3, batch_size=2, warmup=1), progress=False)
    info["command"] = "test"
    folder = zoo_train.save(model, tok, spec, info, tmp_path / "tiny")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "model.safetensors", "residscope_zoo.json", "tokenizer.json", "tokenizer_config.json"]
        + [p.name for p in folder.iterdir() if p.name == "special_tokens_map.json"])
    loaded = load_model(folder)
    ids = loaded.to_tokens("def f(x): return x + 1")
    with torch.no_grad():
        assert_close(loaded(ids), model(ids))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left behind
    with pytest.raises(ValueError, match="--name"):
        zoo_train.spec_for("zoo-transformer-xl")


# ---- extension on the zoo (measured numbers in the comments: 4096 held-out tokens, stride length / 2) -------------------
# What the papers lead one to expect and did NOT hold on this zoo (500 steps of 8 x 128 tokens; see the issue report):
#   RoPE model at 4x (factor 4): direct extrapolation (63.4) beat PI (80.3), NTK (63.8), dynamic NTK (65.0) and YaRN (66.8);
#   NoPE model: positional-vector replacement (layer 1, alpha 1) was worse than direct extrapolation (89.5 vs 85.2 at 4x)
#   although it pulls the positional vectors back towards the in-window set (test below);
#   window model: window extension (32 -> 128, lambda 1.4) stays flat (80.8 -> 84.7) but above the unextended model (70);
#   passkey: no zoo model retrieves a key even inside its window, so the "superficial" claim cannot be tested on it.
def _ppl(model, method: str, length: int, factor: float, **kw) -> float:
    from residscope.analyses.extension import extension_perplexity

    rows = extension_perplexity(model, [method], [length], factor=factor, max_tokens=4096, progress=False,
                                method_kw={method: kw})
    return rows[0].ppl


@pytest.mark.slow
def test_zoo_extension_claims_that_hold():
    rope = load_model("zoo-rope")
    # at 8x only dynamic NTK beats direct extrapolation (72.6 vs 73.5; NTK 74.4, YaRN 75.3, PI 92.8 at factor 8;
    # with factor 4 at 8x, NTK 71.0, dynamic NTK 72.0 and YaRN 71.6 beat it too, PI 81.9 does not)
    assert _ppl(rope, "dynamic-ntk", 1024, 8.0) < _ppl(rope, "none", 1024, 8.0)
    small = load_model("zoo-rope-smallbase")  # base 20, far below the bound: perplexity stays low at 8x (57.3 -> 65.5)
    assert _ppl(small, "none", 1024, 8.0) < 1.2 * _ppl(small, "none", 128, 8.0)
    alibi = load_model("zoo-alibi")  # ALiBi as is: flat (54.2 -> 54.3)
    assert _ppl(alibi, "none", 1024, 1.0) == pytest.approx(_ppl(alibi, "none", 128, 1.0), rel=0.03)
    window = load_model("zoo-window")  # sliding window: flat without extension (70.4 -> 70.3), and with it (80.8 -> 84.7)
    assert _ppl(window, "none", 1024, 1.0) == pytest.approx(_ppl(window, "none", 128, 1.0), rel=0.03)
    assert _ppl(window, "window", 1024, 4.0) < 1.1 * _ppl(window, "window", 128, 4.0)


@pytest.mark.slow
def test_pv_replacement_pulls_nope_positional_vectors_back_into_the_window():
    from residscope.analyses.extension import positional_drift

    nope = load_model("zoo-nope")
    direct = positional_drift(nope, "none", 512, factor=4.0, samples=16).relative_distance  # [0.93, 0.86, 0.86, 0.82, 0.82]
    replaced = positional_drift(nope, "pv-replace", 512, factor=4.0, samples=16).relative_distance  # [0.93, 0.54, 0.61, ...]
    assert replaced[0] == pytest.approx(direct[0])  # below the replacement layer nothing changes
    assert all(r < 0.85 * d for r, d in zip(replaced[2:], direct[2:]))
