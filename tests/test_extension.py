"""Context-window extension methods: each is the identity at factor 1, sets exactly what it says, and is undone on exit;
PI / NTK frequencies agree with the RoPE-bound code; the perplexity windows and passkey prompts are what they claim."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from residscope.analyses import extension as ext
from residscope.analyses import passkey
from residscope.analyses.perplexity import perplexity
from residscope.analyses.positional import decompose_positions, resid_hook_name
from residscope.analyses.rope_bound import default_inv_freq, ntk_base, rope_frequencies
from residscope.model import Decoder, DecoderConfig

VOCAB, WINDOW = 61, 16


def _model(positional: str = "rope", sliding_window: int | None = None, layer_types=None, seed: int = 0) -> Decoder:
    cfg = {"model_type": "mistral" if sliding_window else "llama", "hidden_size": 32, "intermediate_size": 48,
           "num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": VOCAB, "max_position_embeddings": WINDOW,
           "rope_theta": 100.0, "residscope_position_embedding": positional}
    if sliding_window:
        cfg["sliding_window"] = sliding_window
    if layer_types:
        cfg["layer_types"] = layer_types
    torch.manual_seed(seed)
    model = Decoder(DecoderConfig.from_hf(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def _ids(batch: int = 2, pos: int = 3 * WINDOW, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _decomposition(model, length: int):
    return decompose_positions(model, [_ids(4, length, seed=s) for s in range(3)], progress=False)


def _pv_kw(model) -> dict:
    dec = _decomposition(model, WINDOW)
    return dict(decomposition=dec, original=_decomposition(model, 3 * WINDOW))


@pytest.mark.parametrize("method", ["none", "pi", "ntk", "dynamic-ntk", "yarn", "pv-replace"])
def test_every_rope_method_is_the_identity_at_factor_one(method):
    model = _model("rope")
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
        kw = _pv_kw(model) if method == "pv-replace" else {}
        if method == "pv-replace":  # the original vectors are those of the in-window decomposition at factor 1
            kw["original"] = kw["decomposition"]
        if method in ("pv-replace", "dynamic-ntk"):
            # dynamic NTK (transformers' formula) rescales by L / W beyond the window even at factor 1: that is the
            # method; within the window it is the identity at every factor (see test_dynamic_ntk_leaves_...)
            ids, ref = ids[:, :WINDOW], ref[:, :WINDOW]
        with ext.apply_method(model, method, 1.0, **kw):
            out = model(ids)
    assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_window_extension_and_pv_replace_are_the_identity_at_factor_one():
    model = _model("none", sliding_window=8)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
        with ext.apply_method(model, "window", 1.0):
            assert_close(model(ids), ref, atol=1e-6, rtol=1e-6)
        dec = _decomposition(model, WINDOW)
        with ext.apply_method(model, "pv-replace", 1.0, decomposition=dec, original=dec):
            assert_close(model(ids[:, :WINDOW]), ref[:, :WINDOW], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["pi", "ntk", "dynamic-ntk", "yarn"])
def test_rope_methods_change_the_logits_beyond_the_window_and_are_undone(method):
    model = _model("rope")
    ids = _ids()
    before = model.positional_state()
    with torch.no_grad():
        ref = model(ids)
        with ext.apply_method(model, method, 4.0) as e:
            out = model(ids)
            assert e.cache_safe and e.settings["window"] == WINDOW
        assert not torch.allclose(out, ref, atol=1e-3)
        assert model.positional_state() == before
        assert_close(model(ids), ref, atol=0, rtol=0)


def test_dynamic_ntk_leaves_sequences_within_the_window_alone():
    model = _model("rope")
    ids = _ids(pos=WINDOW)
    with torch.no_grad():
        ref = model(ids)
        with ext.apply_method(model, "dynamic-ntk", 8.0):
            assert_close(model(ids), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0])
def test_pi_and_ntk_frequencies_match_the_rope_bound_code(factor):
    model = _model("rope")
    d, base = model.cfg.d_head, 100.0
    with ext.apply_method(model, "pi", factor):
        got = rope_frequencies(model.blocks[1].attn.rope, d)
    assert_close(got, default_inv_freq(base, d) / factor, atol=0, rtol=1e-6)
    with ext.apply_method(model, "ntk", factor):
        rope = model.blocks[2].attn.rope
        assert rope.rope_type == "default"
        assert rope.theta == pytest.approx(ntk_base(base, factor, d)) == pytest.approx(base * factor ** (d / (d - 2)))
        got = rope_frequencies(rope, d)
    assert_close(got, default_inv_freq(ntk_base(base, factor, d), d), atol=0, rtol=1e-6)
    # NTK-aware scaling stretches the lowest frequency by exactly the factor and leaves the highest alone
    assert got[-1].item() == pytest.approx(default_inv_freq(base, d)[-1].item() / factor, rel=1e-5)
    assert got[0].item() == 1.0


def test_yarn_sets_its_attention_factor():
    model = _model("rope")
    with ext.apply_method(model, "yarn", 4.0) as e:
        rope = model.blocks[0].attn.rope
        assert rope.rope_type == "yarn" and rope.original_max_position_embeddings == WINDOW
        assert e.settings["factor"] == 4.0
    from residscope.model.rope import inv_freq

    _, scale = inv_freq(rope, model.cfg.d_head)
    assert scale == pytest.approx(0.1 * math.log(4.0) + 1)


def test_window_extension_changes_only_window_and_logit_scale_of_window_layers():
    model = _model("none", sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    before = model.positional_state()
    with ext.apply_method(model, "window", 4.0, logit_scale=1.3) as e:
        during = model.positional_state()
        assert e.settings["layers"] == [0, 2]
    for i, (b, d) in enumerate(zip(before, during)):
        if i == 1:
            assert d == b
        else:
            assert d == {**b, "window": 32, "logit_scale": 1.3}
    assert model.positional_state() == before
    with ext.apply_method(model, "window", 4.0):  # default lambda: ln(rW) / ln(W)
        assert model.blocks[0].attn.logit_scale == pytest.approx(math.log(32) / math.log(8))


def test_pv_replace_changes_only_its_layer_from_keep_first_on():
    model = _model("none")
    kw = _pv_kw(model)
    ids = _ids(pos=3 * WINDOW)
    layer = 2
    names = [resid_hook_name(i) for i in range(model.cfg.n_layers + 1)]
    with torch.no_grad():
        ref, ref_cache = model.run_with_cache(ids, names_filter=lambda n: n in names)
        with ext.apply_method(model, "pv-replace", 3.0, layer=layer, alpha=1.2, **kw) as e:
            assert not e.cache_safe and e.settings["layer"] == layer
            out, cache = model.run_with_cache(ids, names_filter=lambda n: n in names)
    for i in range(layer):
        assert_close(cache[names[i]], ref_cache[names[i]], atol=0, rtol=0)
    # at the layer itself: exactly h - p_orig + alpha * p_interp, the first keep_first tokens untouched
    assert_close(cache[names[layer]][:, :4], ref_cache[names[layer]][:, :4], atol=0, rtol=0)
    from residscope.analyses.positional import interpolate_positions

    p_orig = kw["original"].vectors[layer][: ids.shape[1]].float()
    p_new = interpolate_positions(kw["decomposition"].vectors[layer], ids.shape[1], 3.0).float()
    expected = ref_cache[names[layer]][:, 4:] - p_orig[4:] + 1.2 * p_new[4:]
    assert_close(cache[names[layer]][:, 4:], expected, atol=1e-5, rtol=1e-5)
    assert_close(out[:, :4], ref[:, :4], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out[:, 4:], ref[:, 4:], atol=1e-3)


def test_errors_name_the_method_and_model():
    nope = _model("none")
    with pytest.raises(ValueError, match="'ntk' scales RoPE"):
        with ext.apply_method(nope, "ntk", 2.0):
            pass
    with pytest.raises(ValueError, match="has none"):
        with ext.apply_method(nope, "window", 2.0):
            pass
    with pytest.raises(ValueError, match="unknown method"):
        with ext.apply_method(nope, "rerope", 2.0):
            pass
    with pytest.raises(ValueError, match="factor must be a finite number >= 1"):
        with ext.apply_method(nope, "none", 0.5):
            pass
    assert ext.applicable_methods(nope) == ["none", "pv-replace"]
    assert ext.applicable_methods(_model("rope")) == ["none", "pi", "ntk", "dynamic-ntk", "yarn", "dca", "pv-replace"]


def test_pv_replace_is_not_offered_for_a_learned_position_table():
    torch.manual_seed(0)
    gpt2 = Decoder(DecoderConfig.from_hf({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4,
                                          "vocab_size": VOCAB, "n_positions": WINDOW})).eval()
    assert ext.applicable_methods(gpt2) == ["none"]
    with pytest.raises(ValueError, match="method 'pv-replace': this model's learned position table ends at its window"):
        with ext.apply_method(gpt2, "pv-replace", 2.0):
            pass


def test_settings_are_restored_when_the_block_raises():
    model = _model("rope")
    before = model.positional_state()
    with pytest.raises(RuntimeError):
        with ext.apply_method(model, "yarn", 4.0):
            raise RuntimeError("boom")
    assert model.positional_state() == before


@pytest.mark.parametrize("n,length,stride", [(100, 20, 10), (101, 16, 15), (64, 64, 7), (50, 9, 4)])
@pytest.mark.parametrize("bos", [False, True])
def test_sliding_windows_score_each_target_once(n, length, stride, bos):
    windows = ext.sliding_windows(n, length, stride, bos=bos)
    scored = [j for s, e, first in windows for j in range(first, e)]
    assert scored == list(range(0 if bos else 1, windows[-1][1]))  # every target once, in order
    for s, e, first in windows[1:]:
        assert first - s >= length - stride  # every later target has at least length - stride tokens of context


def test_sliding_windows_without_overlap_skip_window_starts_unless_a_bos_predicts_them():
    assert [w[2] for w in ext.sliding_windows(48, 16, 16)] == [1, 17, 33]
    assert [w[2] for w in ext.sliding_windows(48, 16, 16, bos=True)] == [0, 16, 32]


def test_sliding_window_perplexity_without_overlap_equals_plain_perplexity():
    model = _model("rope")
    tokens = _ids(1, 200, seed=3)[0]
    ppl, nll, n, nw = ext.sliding_window_perplexity(model, tokens, 40, stride=40, progress=False)
    chunks = tokens[:200].view(5, 40)
    ref = perplexity(model, [chunks], progress=False)
    assert (n, nw) == (ref.n_tokens, 5)
    assert nll == pytest.approx(ref.nll, rel=1e-6)
    # with a BOS in front, each window holds length - 1 text tokens, all of them predicted (the first from BOS)
    ppl_b, _, n_b, nw_b = ext.sliding_window_perplexity(model, tokens, 41, stride=40, bos=0, progress=False)
    assert nw_b == 5 and n_b == 200


class _PadFallsBackToBos:
    """The token facts of SmolLM2's tokenizer that padding inference reads: BOS == EOS == 0 and no pad token."""

    bos_token_id = eos_token_id = 0
    pad_token_id = None
    padding_side = "left"

    def encode(self, text):
        return [4]  # adds neither BOS nor EOS by itself


def test_sliding_windows_keep_a_separator_that_shares_the_pad_id():
    """A window [BOS 0, separator 0, ...] is running text: no position of it is taken for left padding (the windows are
    passed without a mask)."""
    model = _model("rope")
    tokens = _ids(1, 200, seed=3)[0]
    tokens[::40] = 0  # a separator right after each window's BOS
    plain = ext.sliding_window_perplexity(model, tokens, 41, stride=40, bos=0, progress=False)
    model.tokenizer = _PadFallsBackToBos()
    assert ext.sliding_window_perplexity(model, tokens, 41, stride=40, bos=0, progress=False) == plain


class _DigitTokenizer:
    """Characters as tokens (enough to check prompt construction)."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [0] * add_special_tokens + [ord(c) for c in text]}


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_fits_the_length_and_places_the_key_at_its_depth(depth):
    tok = _DigitTokenizer()
    ids = passkey.passkey_prompt(tok, 2000, depth, "12345")
    text = "".join(chr(i) for i in ids[1:].tolist())
    assert len(ids) <= 2000 and len(ids) + len(passkey.FILLER) + 1 > 2000
    assert text.endswith(passkey.QUESTION) and text.count("12345") == 2
    where = text.index("The pass key is 12345") / len(text)
    assert abs(where - depth) < 0.1
    with pytest.raises(ValueError, match="too short"):
        passkey.passkey_prompt(tok, 50, depth, "12345")


def test_drift_is_zero_inside_and_positive_beyond():
    model = _model("none")
    dec = _decomposition(model, 3 * WINDOW)
    drift = ext.drift_from_decomposition(dec, WINDOW)
    assert len(drift) == model.cfg.n_layers + 1 and all(d >= 0 for d in drift)
    inside_only = ext.drift_from_decomposition(dec, 3 * WINDOW)
    assert inside_only == [0.0] * (model.cfg.n_layers + 1)
