"""Parity of model/rope.py's frequencies with transformers' own RoPE initialisers, for every supported rope_type."""

import pytest
import torch

from residscope.model.rope import RopeParams, inv_freq, rope_cos_sin

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

HEAD_DIM = 64
MAX_POS = 4096

CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "default-big-base": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "linear-partial": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.5},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024},
    "yarn-notrunc": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0, "original_max_position_embeddings": 512,
                     "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024,
                    "mscale": 0.707, "mscale_all_dim": 0.707},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 512},
}


def _hf(rope_parameters: dict, seq_len: int | None):
    config = LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
                         max_position_embeddings=MAX_POS, rope_parameters=dict(rope_parameters))
    kind = rope_parameters["rope_type"]
    if kind == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=seq_len)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("seq_len", [None, 3 * MAX_POS])  # dynamic NTK rescales only above the window
def test_inv_freq_matches_transformers(name, seq_len):
    hf = CASES[name]
    params = RopeParams.from_hf(hf, max_position_embeddings=MAX_POS)
    ours, ours_scale = inv_freq(params, HEAD_DIM, seq_len=seq_len)
    ref, ref_scale = _hf(hf, seq_len)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)  # same float32 arithmetic: bit-identical
    assert ours_scale == pytest.approx(ref_scale, rel=1e-12)


def test_dynamic_changes_only_above_window():
    params = RopeParams.from_hf(CASES["dynamic"], max_position_embeddings=MAX_POS)
    at_window, _ = inv_freq(params, HEAD_DIM, seq_len=MAX_POS)
    below, _ = inv_freq(params, HEAD_DIM, seq_len=10)
    above, _ = inv_freq(params, HEAD_DIM, seq_len=2 * MAX_POS)
    torch.testing.assert_close(below, at_window, rtol=0, atol=0)
    assert (above[1:] < at_window[1:]).all()  # a larger base slows every non-constant frequency


@pytest.mark.parametrize("name", CASES)
def test_float64_path_is_float32_path_refined(name):
    """dtype=float64 gives the same frequencies without float32 rounding (a bug would differ by far more than 1e-6)."""
    params = RopeParams.from_hf(CASES[name], max_position_embeddings=MAX_POS)
    f32, _ = inv_freq(params, HEAD_DIM, seq_len=2 * MAX_POS)
    f64, _ = inv_freq(params, HEAD_DIM, seq_len=2 * MAX_POS, dtype=torch.float64)
    assert f64.dtype == torch.float64
    torch.testing.assert_close(f64.float(), f32, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["default", "linear", "yarn", "llama3"])
def test_cos_sin_match_transformers_rotary_embedding(name):
    hf = CASES[name]
    config = LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
                         max_position_embeddings=MAX_POS, rope_parameters=dict(hf))
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.tensor([[0, 1, 7, 100, 1000, 4095]])
    x = torch.zeros(1, positions.shape[1], HEAD_DIM)
    ref_cos, ref_sin = rotary(x, positions)
    cos, sin = rope_cos_sin(RopeParams.from_hf(hf, max_position_embeddings=MAX_POS), HEAD_DIM, positions)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=0)
