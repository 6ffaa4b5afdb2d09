"""RoPE base / context-length bounds against brute force (numpy, direct cos), and on a model's own frequencies."""

import math

import numpy as np
import pytest
import torch

from residscope.analyses import rope_bound as rb
from residscope.model.config import DecoderConfig
from residscope.model.rope import RopeParams, inv_freq


def brute_theta(base, head_dim):
    return float(base) ** (-np.arange(0, head_dim, 2) / head_dim)


def brute_b(theta, stop):
    m = np.arange(stop + 1, dtype=np.float64)
    return np.cos(np.outer(m, theta)).sum(1)  # [stop + 1]


def brute_first_negative(theta, stop):
    neg = np.nonzero(brute_b(theta, stop) < 0)[0]
    return int(neg[0]) if neg.size else None


def test_rope_sum_matches_direct_sum():
    theta = brute_theta(5e5, 128)
    m = np.array([0, 1, 17, 4096, 123_457, 1_048_576])
    expected = [math.fsum(math.cos(int(x) * t) for t in theta) for x in m]
    got = rb.rope_sum(torch.tensor(m), 5e5, 128)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-8)
    assert float(rb.rope_sum(0, 1e4, 16)[0]) == 8.0


@pytest.mark.parametrize("head_dim,base", [(8, 30.0), (16, 100.0), (16, 2e3), (32, 1e4), (128, 1e4), (128, 4.2e4), (128, 1.5e5)])
def test_context_bound_matches_brute_force(head_dim, base):
    stop = 60_000
    first = brute_first_negative(brute_theta(base, head_dim), stop)
    assert first is not None  # every case here dips below zero within the scan
    got = rb.context_bound(base, head_dim, max_m=stop)
    assert (got.first_negative, got.bound, got.capped) == (first, first - 1, False)
    assert got.min_value >= 0


def test_context_bound_from_frequencies_and_cap():
    theta = torch.tensor(brute_theta(1e4, 64))
    assert rb.context_bound(inv_freq=theta).bound == rb.context_bound(1e4, 64).bound
    # Half of the pairs unrotated (frequency 0): B >= 0 everywhere, so the scan must report a capped bound.
    padded = torch.cat((theta[:16], torch.zeros(16, dtype=torch.float64)))
    capped = rb.context_bound(inv_freq=padded, max_m=100_000)
    assert capped.capped and capped.bound == 100_000 and capped.first_negative is None
    with pytest.raises(ValueError, match="head_dim"):
        rb.context_bound(1e4, 15)
    with pytest.raises(ValueError, match="base"):
        rb.context_bound(1.0, 16)
    with pytest.raises(ValueError, match="inv_freq"):
        rb.context_bound(1e4, 16, inv_freq=theta)


def _brute_grid_answer(length, head_dim, step, k_max):
    """Index of the first grid base (1 + step)^k that passes, by scanning every grid point from k = 1."""
    for k in range(1, k_max):
        if brute_first_negative(brute_theta((1 + step) ** k, head_dim), length) is None:
            return k
    raise AssertionError("no passing base on the grid")


@pytest.mark.parametrize("head_dim,length,step", [(8, 40, 1e-3), (16, 100, 1e-3), (16, 300, 2e-3), (128, 1024, 1e-2)])
def test_base_lower_bound_matches_brute_force_grid(head_dim, length, step):
    got = rb.base_lower_bound(length, head_dim, grid_step=step, refine_rtol=1e-7)
    k = _brute_grid_answer(length, head_dim, step, k_max=int(math.log(1e6) / math.log1p(step)))
    assert got.grid_value == pytest.approx((1 + step) ** k, rel=1e-12)
    # verified by an independent brute force: value passes on [0, length], below fails, and they are close
    assert brute_first_negative(brute_theta(got.value, head_dim), length) is None
    assert brute_first_negative(brute_theta(got.below, head_dim), length) == got.below_first_negative
    assert got.below < got.value <= got.grid_value and got.value / got.below - 1 <= 1e-7 * 1.01
    assert got.verified and got.min_value >= 0 and got.reach >= length


def test_paper_row_1k_and_non_monotone_base():
    row = rb.base_lower_bound(1024, 128)
    assert row.verified and f"{row.value:.2g}" == "4.3e+03"
    assert brute_first_negative(brute_theta(row.value, 128), 1024) is None
    assert brute_first_negative(brute_theta(row.value * (1 - 2e-6), 128), 1024) is not None
    # B is not monotone in the base: the published 4k value 2.7e4 lies above our 2.695e4 yet fails at m = 4079
    four_k = rb.base_lower_bound(4096, 128)
    assert four_k.value < 2.7e4
    assert brute_first_negative(brute_theta(four_k.value, 128), 4096) is None
    assert brute_first_negative(brute_theta(2.7e4, 128), 4096) == rb.context_bound(2.7e4, 128).first_negative == 4079


def test_base_lower_bounds_one_sweep_equals_separate_calls():
    together = rb.base_lower_bounds([300, 100], 16)
    assert [b.length for b in together] == [300, 100]
    assert together[1].value == rb.base_lower_bound(100, 16).value
    with pytest.raises(ValueError, match="length"):
        rb.base_lower_bound(0, 16)


def test_ntk_params_equal_dynamic_ntk_at_matching_length():
    """NTK-aware base s^(d/(d-2)) is what dynamic NTK (model code and transformers) uses at seq_len = s * window."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim, window, s = 64, 2048, 4.0
    base = RopeParams(theta=1e4)
    ntk = rb.ntk_params(base, s, head_dim)
    assert ntk.theta == pytest.approx(1e4 * s ** (64 / 62), rel=1e-15)
    dyn = RopeParams(theta=1e4, rope_type="dynamic", factor=1.0, max_position_embeddings=window)
    ours_dyn, _ = inv_freq(dyn, head_dim, seq_len=int(s * window), dtype=torch.float64)
    torch.testing.assert_close(rb.rope_frequencies(ntk, head_dim), ours_dyn, rtol=1e-13, atol=0)
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=window,
                         rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 1.0})
    ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, None, seq_len=int(s * window))
    torch.testing.assert_close(rb.rope_frequencies(ntk, head_dim).float(), ref, rtol=2e-7, atol=0)
    # a larger base reaches further
    assert rb.context_bound(ntk.theta, head_dim).bound > rb.context_bound(1e4, head_dim).bound


def test_rope_frequencies_pad_partial_rotary_with_zero():
    params = RopeParams(theta=1e4, partial_rotary_factor=0.5)
    freq = rb.rope_frequencies(params, 32)
    assert freq.shape == (16,) and freq.dtype == torch.float64
    torch.testing.assert_close(freq[:8], torch.tensor(brute_theta(1e4, 16)), rtol=1e-14, atol=0)
    assert (freq[8:] == 0).all()


def test_model_bounds_per_layer_kind():
    cfg = DecoderConfig(model_type="gemma3_text", n_layers=3, d_model=64, n_heads=4, n_kv_heads=2, d_head=16, d_mlp=128,
                        d_vocab=100, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        sliding_window=64,
                        rope={"sliding_attention": RopeParams(theta=1e4),
                              "full_attention": RopeParams(theta=1e6, rope_type="linear", factor=8.0)},
                        max_position_embeddings=32768)
    rows = {r.layer_kind: r for r in rb.model_bounds(cfg)}
    local, glob = rows["sliding_attention"], rows["full_attention"]
    assert local.layers == [0, 1] and glob.layers == [2]
    assert (local.head_dim, local.rotary_dim, local.base, local.rope_type, local.sliding_window) == (16, 16, 1e4, "default", 64)
    assert local.bound.bound == brute_first_negative(brute_theta(1e4, 16), 10_000) - 1
    linear = torch.tensor(brute_theta(1e6, 16)) / 8
    assert glob.bound.bound == rb.context_bound(inv_freq=linear).bound and glob.factor == 8.0
    assert local.covers_max_positions == (local.bound.bound >= 63)
    assert glob.covers_max_positions == (glob.bound.capped or glob.bound.bound >= 32767)


def test_model_bounds_dynamic_uses_seq_len_and_rejects_non_rope():
    rope = RopeParams(theta=1e4, rope_type="dynamic", factor=2.0, max_position_embeddings=256)
    cfg = DecoderConfig(model_type="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_head=16, d_mlp=128,
                        d_vocab=100, rope={"full_attention": rope}, max_position_embeddings=256)
    at_window = rb.model_bounds(cfg)[0]
    longer = rb.model_bounds(cfg, seq_len=1024)[0]
    assert at_window.bound.bound == rb.context_bound(1e4, 16).bound and at_window.seq_len == 256
    expected = rb.context_bound(1e4 * (2 * 1024 / 256 - 1) ** (16 / 14), 16).bound
    assert longer.bound.bound == expected and longer.seq_len == 1024
    with pytest.raises(ValueError, match="alibi"):
        rb.model_bounds(cfg.replace(positional="alibi", rope={}))


def test_cli_json_fields_and_one_line_errors(capsys):
    import json

    from residscope.apps.cli import main

    main(["rope-bound", "--base", "10000", "--head-dim", "128", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["context_bound"] == rb.context_bound(1e4, 128).bound and out["capped"] is False
    main(["rope-bound", "--length", "100", "--head-dim", "16", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["base_lower_bound"] == rb.base_lower_bound(100, 16).value and out["verified"] is True
    with pytest.raises(SystemExit) as e:
        main(["rope-bound", "--base", "0.5"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--base" in err and "\n" not in err
