"""The zoo: small models trained here that differ only in their positional scheme (model/zoo/<name>/, analyses/zoo_train.py).

Fast checks that the shipped checkpoints load with their documented configs and tokenizer and predict in-window text
well; the training code saves what it loads. The extension claims measured on the zoo are in the `slow` tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from residscope.analyses import passkey, zoo_train
from residscope.model import load_model
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
    # the shipped zoo was built before the trainer moved from model/ to analyses/
    assert info["command"].startswith(("python -m residscope.analyses.zoo_train", "python -m residscope.model.zoo_train"))
    assert info["final_loss"] < 4.0
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
    # the first 2048 tokens of the evaluation split: 104 (nope), 189 (rope), 225 (rope-smallbase), 330 (alibi),
    # 210 (window); a uniform guess over 2048 tokens scores 2048. (Before the split dropped evaluation paragraphs that
    # repeat calibration text, which the zoo saw about 20 times in training, these were 88 to 246, and 48 to 62 over
    # 4096 tokens: memorised text, not held-out prediction.)
    assert ppl < 400, f"zoo-{name}: in-window perplexity {ppl:.1f}"


def test_training_rows_mix_text_passkeys_and_repeats():
    tok = load_model("zoo-rope").tokenizer
    data = zoo_train.TrainingData(tok, 128, passkey_fraction=0.25, seed=0, repeat_fraction=0.25)
    rows = torch.cat([data.batch(8) for _ in range(8)])  # [64, 128]
    assert rows.shape == (64, 128) and bool((rows[:, 0] == tok.bos_token_id).all())
    texts = [tok.decode(r.tolist()) for r in rows]
    passkeys = [t for t in texts if passkey.QUESTION in t]
    repeats = [r for r in rows.tolist() if any(r[1:1 + n] == r[1 + n:1 + 2 * n] for n in range(8, 64))]
    assert 8 <= len(passkeys) <= 24 and 8 <= len(repeats) <= 24  # a quarter each, give or take
    key = passkeys[0].split(passkey.QUESTION)[1].strip()[:5]
    assert key.isdigit() and passkeys[0].count(key) == 3


def test_training_passkeys_are_evaluation_prompts_followed_by_the_key():
    """The zoo learns retrieval from the very prompt the evaluation asks: each training passkey document is an
    evaluation prompt (same intro, filler, key sentence and question) with the key appended."""
    tok = load_model("zoo-rope").tokenizer
    data = zoo_train.TrainingData(tok, 128, passkey_fraction=1.0, seed=3)
    texts = [tok.decode(r.tolist(), skip_special_tokens=True) for r in data.batch(8)]
    for text in texts:
        document = text[:text.index(passkey.QUESTION) + len(passkey.QUESTION) + 7]  # question, " ", 5 digits, "."
        key = document[-6:-1]
        n_before = document.split(f"The pass key is {key}.")[0].count(passkey.FILLER)
        n_filler = document.count(passkey.FILLER)
        depth = n_before / n_filler if n_filler else 0.0
        assert document == passkey.passkey_text(key, n_filler, depth) + f" {key}."
    for n_before in range(4):
        for n_after in range(4):
            n = n_before + n_after
            assert passkey.passkey_document("12345", n_before, n_after, answer=True) == \
                passkey.passkey_text("12345", n, n_before / n if n else 0.0) + " 12345."


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


# ---- extension on the zoo ---------------------------------------------------------------------------------------------
# Measured numbers in the comments: 4096 held-out tokens, windows `length` long, stride length / 2 (so every scored token
# has at least length / 2 tokens of context), trained window 128. They are deterministic (seeded decompositions, greedy
# decoding); the margins asserted are far from rounding unless a comment says otherwise.
# The evaluation split no longer holds paragraphs that repeat calibration (training) text (README "Built-in corpus"),
# so every perplexity rose (the zoo had memorised those paragraphs) and some ratios shrank; "old split:" gives the
# figures measured before, and where an asserted threshold had to follow the new measurements the comment says so.
def _ppl(model, method: str, length: int, factor: float, **kw) -> float:
    from residscope.analyses.extension import extension_perplexity

    rows = extension_perplexity(model, [method], [length], factor=factor, max_tokens=4096, progress=False,
                                method_kw={method: kw})
    return rows[0].ppl


def _passkey(model, length: int, depths=(0.0, 0.5, 1.0)) -> list[float]:
    from residscope.analyses.extension import passkey_accuracy

    return [row.accuracy for row in passkey_accuracy(model, [length], depths, n_keys=5, progress=False)]


@pytest.mark.slow
def test_rope_scalings_beat_direct_extrapolation_at_4x_except_pi():
    rope = load_model("zoo-rope")
    inside, direct = _ppl(rope, "none", 128, 4.0), _ppl(rope, "none", 512, 4.0)  # 312.4 -> 805.3: extrapolation fails
    assert direct > 2.5 * inside  # 2.6x (old split: 50.2 -> 284.1, asserted > 4x)
    for method in ("dynamic-ntk", "yarn"):  # 470.0, 503.5 (old split: 120.8, 120.7)
        assert _ppl(rope, method, 512, 4.0) < 0.7 * direct, method
    # NTK gains less on held-out text: 630.3 = 0.78x direct (old split: 185.9 = 0.65x, asserted < 0.7x with the others)
    assert _ppl(rope, "ntk", 512, 4.0) < 0.85 * direct
    # PI only ties with direct extrapolation at 4x (796.1): dividing every frequency by 4 costs as much inside the
    # window (833.1 at 128 tokens) as it saves beyond it; a model this small leans on its fast frequencies
    pi_inside = _ppl(rope, "pi", 128, 4.0)
    assert pi_inside > 2.5 * inside  # 2.7x (old split: 283.3 vs 50.2, asserted > 4x)
    assert _ppl(rope, "pi", 512, 4.0) == pytest.approx(direct, rel=0.05)


@pytest.mark.slow
def test_positional_vector_replacement_beats_direct_extrapolation_on_nope():
    from residscope.analyses.extension import calibration_decomposition, positional_drift

    nope = load_model("zoo-nope")
    dec = calibration_decomposition(nope, 128, samples=512)
    original = calibration_decomposition(nope, 512, samples=512)
    direct = _ppl(nope, "none", 512, 4.0)  # 206.7, 152.5 inside the window (old split: 86.6, 47.6)
    kw = dict(decomposition=dec, original=original)
    # layer 1, r 4, alpha 1: 201.9 = 0.977x direct, a thin (but deterministic) margin (old split: 84.3 = 0.973x)
    assert _ppl(nope, "pv-replace", 512, 4.0, **kw) < 0.98 * direct
    # alpha 1.3 as in the paper's r=5: 184.5 = 0.89x (old split: 76.0 = 0.88x)
    assert _ppl(nope, "pv-replace", 512, 4.0, alpha=1.3, **kw) < 0.92 * direct
    # the replaced layer's positional vectors beyond the window move towards the in-window set (drift per residual
    # layer, none: [0.49, 0.74, 0.64, 1.04, 0.30], replaced: [0.49, 0.62, 0.62, 1.10, 0.27]; layer 3 moves away)
    drift_direct = positional_drift(nope, "none", 512, factor=4.0).relative_distance
    drift_replaced = positional_drift(nope, "pv-replace", 512, factor=4.0).relative_distance
    assert drift_replaced[0] == pytest.approx(drift_direct[0])  # below the replacement layer nothing changes
    assert drift_replaced[1] < 0.9 * drift_direct[1]
    # with 64 samples the vectors' own noise (added at every position) costs: 189.7 against 184.5 with 512 (old split:
    # worse than direct extrapolation; on held-out text still better than direct, 206.7)
    noisy = calibration_decomposition(nope, 128, samples=64)
    assert _ppl(nope, "pv-replace", 512, 4.0, alpha=1.3, decomposition=noisy, original=original) > _ppl(
        nope, "pv-replace", 512, 4.0, alpha=1.3, **kw)


@pytest.mark.slow
def test_small_base_gives_superficial_long_context():
    """Men et al.: a base below the bound keeps perplexity low far beyond the window but cannot retrieve there."""
    small, rope = load_model("zoo-rope-smallbase"), load_model("zoo-rope")
    # perplexity 395.0 -> 443.3 at 4x and 540.6 at 8x; base 10000: 312.4 -> 805.3 -> 1012.8
    # (old split: 54.4 -> 81.6 -> 126.6 against 50.2 -> 284.1 -> 471.4)
    assert _ppl(small, "none", 512, 4.0) < 1.6 * _ppl(small, "none", 128, 4.0)
    # 0.55x the base-10000 model at 4x (old split: 0.29x, asserted < 0.4x)
    assert _ppl(small, "none", 512, 4.0) < 0.6 * _ppl(rope, "none", 512, 4.0)
    assert _passkey(small, 128) == [1.0, 1.0, 1.0]  # every key, every depth, inside the window
    assert _passkey(small, 256) == [0.0, 0.0, 0.0]  # none at 2x
    assert _passkey(small, 512) == [0.0, 0.0, 0.0]  # none at 4x


@pytest.mark.slow
def test_alibi_as_is_stays_flat_and_retrieves_nearby_keys_beyond_the_window():
    alibi = load_model("zoo-alibi")
    inside = _ppl(alibi, "none", 128, 1.0)  # 529.9, 523.9 at 512, 526.9 at 1024 (old split: 62.2, 61.6, 62.2)
    assert _ppl(alibi, "none", 1024, 1.0) == pytest.approx(inside, rel=0.03)
    assert _passkey(alibi, 256) == [1.0, 1.0, 1.0]  # 2x: every key
    assert _passkey(alibi, 512) == [0.0, 0.6, 1.0]  # 4x: only keys near the question (ALiBi's recency bias)


@pytest.mark.slow
def test_window_extension_keeps_perplexity_flat_where_full_attention_does_not():
    from residscope.analyses.extension import evaluation_tokens, sliding_window_perplexity

    window = load_model("zoo-window")  # sliding window 32, trained on 128-token rows
    # as trained: flat (359.0, 357.3, 359.1 at 128, 512, 1024; old split: 60.3, 59.5, 59.9)
    assert _ppl(window, "none", 1024, 1.0) == pytest.approx(_ppl(window, "none", 128, 1.0), rel=0.03)
    # window 32 -> 64 (lambda = ln 64 / ln 32 = 1.2): flat, 385.5 -> 396.3 -> 398.6, but above the model as trained:
    # on this zoo the extra context costs more than it brings (lambda 1: 362.7 -> 374.2; old split: 99.5 -> 101.1,
    # lambda 1: 93.2 -> 95.1)
    extended = [_ppl(window, "window", n, 2.0) for n in (128, 512, 1024)]
    assert max(extended) < 1.05 * min(extended)
    # the window removed altogether (every layer attends to everything): 367.9 -> 491.9 -> 543.3 (old split:
    # 107.7 -> 216.8 -> 269.1, asserted to more than double; now 1.48x)
    tokens = evaluation_tokens(window, 4096)
    with window.positional_overrides():
        window.set_window(None)
        full = [sliding_window_perplexity(window, tokens, n, bos=window.cfg.bos_token_id, progress=False)[0] for n in (128, 1024)]
    assert full[1] > 1.4 * full[0]
