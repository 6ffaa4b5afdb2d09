"""Every family, all the way through: parity with transformers (float32 and float64, SDPA and the explicit pattern
path), the TransformerLens surface, every analysis and the surgery, and export back to transformers.

The cases are tiny random transformers models (tests/family_zoo.py); family-specific behaviour (an option only one
family has) is tested in that family's own test file.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from family_zoo import CASES, VOCAB
from residscope.analyses.perplexity import perplexity
from residscope.analyses.positional import attention_statistics, decompose_positions
from residscope.model import InputError, load_model
from residscope.model.families import FAMILIES
from residscope.surgery import block_influence, remove_layers, remove_sublayers

SEQ = 20


def ids(batch=2, seq=SEQ, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(case id, transformers model, residscope model, checkpoint folder), float32."""
    hf = CASES[request.param]()
    folder = tmp_path_factory.mktemp(request.param) / "ckpt"
    hf.save_pretrained(folder)
    return request.param, hf, load_model(folder), folder


def _reference(hf, tokens):
    with torch.no_grad():
        return hf(tokens, output_hidden_states=True)


def _assert_parity(hf, ours, tokens, atol):
    ref = _reference(hf, tokens)
    with torch.no_grad():
        logits, cache = ours.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_pre"))
    assert_close(logits, ref.logits.to(logits.dtype), atol=atol, rtol=atol)
    for i in range(ours.cfg.n_layers):
        # transformers' hidden_states[i] is the input of block i (its last entry is the final-norm output instead)
        assert_close(cache[f"blocks.{i}.hook_resid_pre"], ref.hidden_states[i], atol=atol, rtol=atol)


def test_every_family_has_a_case():
    assert set(FAMILIES) <= {case.split("-")[0] for case in CASES} | {"mistral", "qwen2", "gemma3_text", "baichuan"}, \
        "add a tiny case for every registered family to tests/family_cases_*.py"


def test_parity_float32(pair):
    _, hf, ours, _ = pair
    _assert_parity(hf, ours, ids(), atol=1e-4)


def test_parity_float64(pair, hf_norms_in_float64):
    """A bug stays in float64 while rounding noise shrinks by orders of magnitude."""
    _, hf, _, folder = pair
    ours = load_model(folder, dtype=torch.float64)
    _assert_parity(hf.double(), ours, ids(), atol=1e-8)
    hf.float()


def test_explicit_pattern_path_equals_sdpa(pair):
    _, _, ours, _ = pair
    tokens = ids()
    with torch.no_grad():
        fast = ours(tokens)
        logits, cache = ours.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    assert_close(logits, fast, atol=1e-5, rtol=1e-5)
    pattern = cache[f"blocks.{ours.cfg.n_layers - 1}.attn.hook_pattern"]  # [batch, head, q, k]
    assert pattern.shape == (2, ours.cfg.n_heads, SEQ, SEQ)
    sinks = ours.blocks[-1].attn.sinks
    if sinks is None:
        assert_close(pattern.sum(-1), torch.ones(2, ours.cfg.n_heads, SEQ))
    else:  # gpt-oss: a row holds the real keys' share; the learned sink takes the rest
        _, cache = ours.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_attn_scores"))
        scores = cache[f"blocks.{ours.cfg.n_layers - 1}.attn.hook_attn_scores"].double()  # [batch, head, q, k]
        sink_mass = torch.sigmoid(sinks.double()[None, :, None] - scores.logsumexp(-1))  # e^sink / (e^sink + sum e^s)
        assert_close(pattern.sum(-1).double(), 1 - sink_mass.detach(), atol=1e-6, rtol=1e-5)
        assert (sink_mass > 0.01).all()


def test_kv_cache_generation_equals_full_forward(pair):
    _, _, ours, _ = pair
    tokens = ids(batch=1, seq=8)
    out = ours.generate(tokens, max_new_tokens=4, stop_at_eos=False)
    again = ours.generate(tokens, max_new_tokens=4, stop_at_eos=False, use_past_kv_cache=False)
    assert torch.equal(out, again)


def test_transformer_lens_surface(pair):
    _, hf, ours, _ = pair
    cfg = ours.cfg
    assert cfg.normalization_type == ("LN" if cfg.norm == "layer" else "RMS")
    assert cfg.original_architecture == type(hf).__name__
    assert ours.W_E.shape == (VOCAB, cfg.d_model) and ours.W_U.shape == (cfg.d_model, VOCAB)
    assert ours.W_Q.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head)
    assert ours.W_O.shape == (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model)
    if cfg.positional == "learned":
        assert ours.W_pos.shape == (cfg.n_ctx, cfg.d_model)
    if cfg.final_softcap is None:
        tokens = ids()
        logits, cache = ours.run_with_cache(tokens)
        accum = cache.accumulated_resid(apply_ln=True)  # [layer + 1, batch, pos, d_model]
        assert_close(accum[-1] @ ours.W_U + ours.b_U, logits, atol=1e-4, rtol=1e-4)


def test_block_influence_and_layer_removal(pair):
    _, _, ours, _ = pair
    batches = [ids(seed=s) for s in range(2)]
    scores = block_influence(ours, batches, progress=False)
    assert scores.shape == (ours.cfg.n_layers,) and torch.isfinite(scores).all()
    cut = remove_layers(ours, [1])
    assert cut.cfg.n_layers == ours.cfg.n_layers - 1 and torch.isfinite(cut(ids())).all()
    halves = remove_sublayers(ours, attn=[0], mlp=[ours.cfg.n_layers - 1])
    assert torch.isfinite(halves(ids())).all()


def test_positional_analyses_and_perplexity(pair):
    _, _, ours, _ = pair
    batches = [ids(seed=s) for s in range(2)]
    dec = decompose_positions(ours, batches, progress=False)
    assert dec.vectors.shape[1] == SEQ
    stats = attention_statistics(ours, batches, progress=False)
    assert stats is not None
    result = perplexity(ours, batches, progress=False)
    assert math.isfinite(result.ppl) and result.ppl > 1 and result.n_tokens == 4 * (SEQ - 1)


def test_rope_knobs_apply_or_refuse(pair):
    _, _, ours, _ = pair
    tokens = ids()
    plain = ours(tokens)
    if ours.cfg.positional != "rope":
        with pytest.raises(InputError, match=ours.cfg.model_type):
            ours.set_rope(theta=5e5)
        return
    with ours.positional_overrides():
        ours.set_rope(rope_type="linear", factor=4.0)
        assert not torch.allclose(ours(tokens), plain, atol=1e-4)
    assert_close(ours(tokens), plain, atol=0, rtol=0)


def test_pruned_export_reloads_in_transformers(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    _, _, ours, _ = pair
    cut = remove_layers(ours, [1])
    folder = cut.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = ids()
    with torch.no_grad():
        assert_close(reloaded(tokens).logits, cut(tokens), atol=1e-4, rtol=1e-4)
