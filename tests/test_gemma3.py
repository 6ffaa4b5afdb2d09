"""Gemma 3 (text) parity: residscope's Decoder against transformers' Gemma3ForCausalLM on tiny random checkpoints.

Every config runs a sequence longer than the local sliding window, mixes local and global layers, uses GQA, a
query_pre_attn_scalar different from head_dim, a head_dim different from hidden/heads and different RoPE bases per layer
type; variants add a RoPE scaling on the global layers, attention/final logit soft-capping and untied embeddings.
Norm weights are randomised (transformers initialises them to zero), so the (1 + w) offset is exercised.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from residscope.model.config import FULL, SLIDING
from residscope.model.loading import load_model

WINDOW, SEQ, BATCH, VOCAB = 8, 24, 2, 128
LAYER_TYPES = [SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL]

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=len(LAYER_TYPES),
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,  # 4 * 16 != 48: the attention width is not the model width
    query_pre_attn_scalar=24,  # != head_dim: the scale is 24 ** -0.5, not 16 ** -0.5
    sliding_window=WINDOW,
    layer_types=LAYER_TYPES,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_parameters={
        FULL: {"rope_type": "default", "rope_theta": 1_000_000.0},
        SLIDING: {"rope_type": "default", "rope_theta": 100.0},  # a small local base makes positions matter at seq 24
    },
)

CASES = {
    "default": {},
    "linear_scaled_global": dict(
        rope_parameters={
            FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            SLIDING: {"rope_type": "default", "rope_theta": 100.0},
        }
    ),
    # YaRN on global layers, final logit soft-capping and an untied lm_head in one config; attention soft-capping is
    # set too, and transformers' Gemma 3 ignores it (Gemma 2 applied it), so residscope must as well
    "yarn_softcapped_untied": dict(
        rope_parameters={
            FULL: {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10_000.0},
            SLIDING: {"rope_type": "default", "rope_theta": 100.0},
        },
        attn_logit_softcapping=3.0,
        final_logit_softcapping=4.0,
        tie_word_embeddings=False,
    ),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention is far from uniform and logits are O(1..10); norms (1 + w) far from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p.shape[1] ** 0.5))


def _build(tmp_path_factory, case: str):
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(**{**BASE, **CASES[case]})
    cfg._attn_implementation = "eager"  # the reference: explicit softmax, soft-capping supported
    hf = Gemma3ForCausalLM(cfg).eval()
    _randomise(hf, seed=len(case))
    folder = tmp_path_factory.mktemp(f"gemma3_{case}")
    hf.save_pretrained(folder)
    return hf, folder


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    hf, folder = _build(tmp_path_factory, request.param)
    return request.param, hf, folder, load_model(folder, dtype=torch.float32, load_tokenizer=False)


def _ids(seed: int = 1, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _hook_all_patterns(model):
    """An identity hook on every hook_pattern: forces the explicit attention path."""
    return [(f"blocks.{i}.attn.hook_pattern", lambda t, hook: t) for i in range(model.cfg.n_layers)]


def test_config_is_read(pair):
    case, hf, folder, model = pair
    cfg = model.cfg
    assert cfg.layer_types == LAYER_TYPES and cfg.sliding_window == WINDOW
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model) == (4, 2, 16, 48)
    assert cfg.scale == pytest.approx(24**-0.5)
    assert cfg.norm_offset == 1.0 and cfg.qk_norm and cfg.post_norms and cfg.embed_scale == pytest.approx(48**0.5)
    assert cfg.rope[SLIDING].theta == 100.0 and cfg.rope[FULL].rope_type == hf.config.rope_parameters[FULL]["rope_type"]
    assert cfg.tie_embeddings == hf.config.tie_word_embeddings
    assert cfg.attn_softcap is None and cfg.final_softcap == hf.config.final_logit_softcapping


def test_logits_and_residual_stream_match_transformers(pair):
    case, hf, folder, model = pair
    ids = _ids()
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        logits, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_pre") or n == "ln_final.hook_normalized")
    assert out.logits.abs().max() > 1.0, "degenerate test model: logits too small to compare meaningfully"
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)
    for i in range(model.cfg.n_layers):
        torch.testing.assert_close(cache[f"blocks.{i}.hook_resid_pre"], out.hidden_states[i], atol=1e-4, rtol=1e-4)
    # transformers' last hidden state is the final-norm output, not the last block's output
    torch.testing.assert_close(cache["ln_final.hook_normalized"], out.hidden_states[-1], atol=1e-4, rtol=1e-4)


def test_window_matters(pair):
    """Guard against a vacuous test: a full-attention run must differ, so the sliding window is really exercised."""
    case, hf, folder, model = pair
    ids = _ids()
    with torch.no_grad():
        windowed = model(ids)
        with model.positional_overrides():
            model.set_window(None)
            full = model(ids)
    assert (windowed[:, WINDOW:] - full[:, WINDOW:]).abs().max() > 1e-3
    torch.testing.assert_close(windowed[:, :WINDOW], full[:, :WINDOW], atol=1e-5, rtol=1e-5)


def test_explicit_attention_path_equals_sdpa(pair):
    case, hf, folder, model = pair
    ids = _ids(seed=2)
    with torch.no_grad():
        fast = model(ids)
        explicit = model.run_with_hooks(ids, fwd_hooks=_hook_all_patterns(model))
    torch.testing.assert_close(explicit, fast, atol=1e-5, rtol=1e-5)


def test_pattern_respects_sliding_window(pair):
    case, hf, folder, model = pair
    ids = _ids(seed=3, batch=1)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    i, j = torch.arange(SEQ)[:, None], torch.arange(SEQ)[None, :]
    for layer, kind in enumerate(LAYER_TYPES):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [head, q, k]
        allowed = (j <= i) & ((j > i - WINDOW) if kind == SLIDING else torch.ones_like(j, dtype=torch.bool))
        assert (pattern[:, ~allowed] == 0).all()
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:2]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_unpadded(pair, side):
    case, hf, folder, model = pair
    short, long = _ids(seed=4, batch=1, seq=SEQ - 7), _ids(seed=5, batch=1, seq=SEQ)
    pad = torch.zeros(1, 7, dtype=torch.long)
    padded_short = torch.cat((pad, short), 1) if side == "left" else torch.cat((short, pad), 1)
    mask_short = torch.cat((pad, torch.ones_like(short)), 1) if side == "left" else torch.cat((torch.ones_like(short), pad), 1)
    ids, mask = torch.cat((padded_short, long)), torch.cat((mask_short, torch.ones_like(long)))
    real = slice(7, None) if side == "left" else slice(0, SEQ - 7)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        batched_explicit = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=_hook_all_patterns(model))
        alone_short, alone_long = model(short), model(long)
    torch.testing.assert_close(batched[0, real], alone_short[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched[1], alone_long[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched_explicit[0, real], alone_short[0], atol=1e-4, rtol=1e-4)


def test_float64_parity_is_tight(pair, hf_norms_in_float64):
    """In float64 any remaining difference is a formula difference, not rounding.

    Both our attention paths stay in float64 (the explicit one takes its softmax in float64 for float64 models), so
    both equal transformers' SDPA path; transformers' eager path rounds its softmax through float32 and is not used here,
    and its norms are kept in float64 like ours (`hf_norms_in_float64`).
    """
    case, hf, folder, model = pair
    ids = _ids(seed=6)
    model64 = load_model(folder, dtype=torch.float64, load_tokenizer=False)
    with torch.no_grad():
        ours_sdpa = model64(ids)
        ours_explicit = model64.run_with_hooks(ids, fwd_hooks=_hook_all_patterns(model64))
        ref = Gemma3ForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="sdpa").eval()(ids).logits
        for ours in (ours_sdpa, ours_explicit):
            assert ours.dtype == ref.dtype == torch.float64
            torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)


def test_legacy_config_keys(tmp_path_factory):
    """Hub Gemma 3 configs carry rope_theta, rope_local_base_freq, rope_scaling and sliding_window_pattern (no
    layer_types, no rope_parameters): they must give the same model."""
    hf, folder = _build(tmp_path_factory, "linear_scaled_global")
    cfg = json.loads((folder / "config.json").read_text())
    for key in ("layer_types", "rope_parameters"):
        cfg.pop(key)
    cfg.update(
        rope_theta=1_000_000.0, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
        sliding_window_pattern=3,
    )
    (folder / "config.json").write_text(json.dumps(cfg))
    model = load_model(folder, load_tokenizer=False)
    assert model.cfg.layer_types == LAYER_TYPES
    ids = _ids(seed=7)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
