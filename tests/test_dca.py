"""Dual Chunk Attention (model/dca.py): against a direct [pos, pos] reference with the three position sets, in float64."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from conftest import save_hf
from residscope.model import load_model
from residscope.model.dca import DualChunk, key_part, query_positions
from residscope.model.errors import InputError
from residscope.model.rope import RopeParams, apply_rope, rope_cos_sin


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = save_hf(transformers.LlamaForCausalLM(cfg), tmp_path_factory.mktemp("tiny_dca"))
    return load_model(folder, dtype="float64", load_tokenizer=False)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))


def rotate_at(x: torch.Tensor, positions: torch.Tensor, rope: RopeParams) -> torch.Tensor:
    """x [batch, pos, head, d] rotated at integer `positions` [pos]."""
    cos, sin = rope_cos_sin(rope, x.shape[-1], positions[None].expand(x.shape[0], -1), dtype=x.dtype)
    return apply_rope(x, cos, sin)


def reference_dca(model, ids, dca: DualChunk, layer: int = 0):
    """The layer's DCA attention output z [batch, pos, head, d] and pattern, from hook_q / hook_k / hook_v, by the
    definition: score(i, j) = rot(q_i, P(i, j)) . rot(k_j, j % chunk_len) with P by the key's chunk, one softmax."""
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.startswith(f"blocks.{layer}.attn.hook_"))
    attn = model.blocks[layer].attn
    q, k, v = (cache[f"blocks.{layer}.attn.hook_{x}"] for x in "qkv")  # [batch, pos, head, d]
    n = ids.shape[1]
    idx = torch.arange(n)
    cl, cs = dca.chunk_len, dca.chunk_size
    k_rot = rotate_at(k, idx % cl, attn.rope).repeat_interleave(attn.n_rep, dim=2)
    v = v.repeat_interleave(attn.n_rep, dim=2)
    s = dca.temperature(n)
    scores = torch.full((ids.shape[0], attn.n_heads, n, n), float("-inf"), dtype=q.dtype)
    for i in range(n):
        for j in range(i + 1):
            gap = i // cl - j // cl
            p = i % cl if gap == 0 else (min(i % cl + cl, cs) if gap == 1 else cs)
            qi = rotate_at(q[:, i:i + 1], torch.tensor([p]), attn.rope)[:, 0]  # [batch, head, d]
            scores[:, :, i, j] = (qi * k_rot[:, j]).sum(-1) * attn.scale * s * s
    pattern = scores.softmax(-1)
    return torch.einsum("bhij,bjhd->bihd", pattern, v), pattern


def test_positions_and_parts():
    dca = DualChunk(chunk_size=8, local_size=3)  # chunk_len 5
    intra, succ, inter = query_positions(dca, torch.arange(12))
    assert intra.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert succ.tolist() == [5, 6, 7, 8, 8, 5, 6, 7, 8, 8, 5, 6]
    assert set(inter.tolist()) == {8}
    part = key_part(dca, torch.tensor([11]), torch.arange(12))[0]
    assert part.tolist() == [2] * 5 + [1] * 5 + [0, 0]


@pytest.mark.parametrize("orig", [None, 16])
def test_matches_reference(tiny, ids, orig):
    dca = DualChunk(chunk_size=12, local_size=4, original_max_position_embeddings=orig)  # 40 tokens: 5 chunks of 8
    with tiny.positional_overrides():
        tiny.set_dual_chunk_attention(12, 4, orig)
        ref_z, ref_pattern = reference_dca(tiny, ids, dca)
        _, fast = tiny.run_with_cache(ids, names_filter="blocks.0.attn.hook_z")
        _, slow = tiny.run_with_cache(ids, names_filter=["blocks.0.attn.hook_z", "blocks.0.attn.hook_pattern"])
    torch.testing.assert_close(fast["blocks.0.attn.hook_z"], ref_z, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(slow["blocks.0.attn.hook_z"], ref_z, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(slow["blocks.0.attn.hook_pattern"], ref_pattern, rtol=1e-10, atol=1e-10)


def test_within_one_chunk_equals_full_attention(tiny, ids):
    plain = tiny(ids[:, :16])
    with tiny.positional_overrides():
        tiny.set_dual_chunk_attention(20, 4)  # chunk_len 16
        torch.testing.assert_close(tiny(ids[:, :16]), plain, rtol=1e-12, atol=1e-12)
        longer = tiny(ids)
    assert not torch.allclose(longer[:, 17:], tiny(ids)[:, 17:])  # past one chunk it is not full attention
    assert tiny.dual_chunk_settings() == [None, None]


def test_kv_cache_decoding_matches_full_forward(tiny, ids):
    from residscope.model.decoder import KVCache

    with tiny.positional_overrides():
        tiny.set_dual_chunk_attention(12, 4, 16)
        prefix = tiny(ids[:1, :30])
        cache = KVCache()
        parts = [tiny(ids[:1, :30], kv_cache=cache)] + [tiny(ids[:1, t:t + 1], kv_cache=cache) for t in range(30, 40)]
        stepped = torch.cat(parts, dim=1)
        # with the temperature, cached keys keep the one of the forward that made them (as vLLM's cache does)
        torch.testing.assert_close(stepped[:, :30], prefix, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(stepped[:, 30:], tiny(ids[:1])[:, 30:])
    with tiny.positional_overrides():
        tiny.set_dual_chunk_attention(12, 4)
        full = tiny(ids[:1])
        cache = KVCache()
        parts = [tiny(ids[:1, :30], kv_cache=cache)] + [tiny(ids[:1, t:t + 1], kv_cache=cache) for t in range(30, 40)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-10, atol=1e-10)


def test_combines_with_yarn_and_restores(tiny, ids):
    before = tiny(ids)
    with tiny.positional_overrides():
        tiny.set_rope(rope_type="yarn", factor=2.0, original_max_position_embeddings=64)
        tiny.set_dual_chunk_attention(12, 4)
        dca = DualChunk(12, 4)
        ref_z, _ = reference_dca(tiny, ids, dca)  # rotates with the layer's YaRN setting
        _, fast = tiny.run_with_cache(ids, names_filter="blocks.0.attn.hook_z")
        torch.testing.assert_close(fast["blocks.0.attn.hook_z"], ref_z, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tiny(ids), before, rtol=0, atol=0)


def test_temperature_formula():
    dca = DualChunk(12, 4, original_max_position_embeddings=100)
    assert dca.temperature(50) == 1.0
    assert dca.temperature(400) == pytest.approx(0.1 * math.log(4) + 1)
    assert DualChunk(12, 4).temperature(10**6) == 1.0


@pytest.mark.parametrize("kw, word", [
    (dict(chunk_size=4, local_size=4), "chunk_size"),
    (dict(chunk_size=8, local_size=0), "local_size"),
    (dict(chunk_size=8, local_size=-2), "local_size"),
    (dict(chunk_size=8, local_size=2, original_max_position_embeddings=0), "original_max_position_embeddings"),
])
def test_bad_settings(tiny, kw, word):
    with pytest.raises(InputError, match=word) as e:
        tiny.set_dual_chunk_attention(**kw)
    assert "\n" not in str(e.value)


def test_refused_on_non_rotary(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    folder = save_hf(transformers.LlamaForCausalLM(cfg), tmp_path)
    data = json.loads((folder / "config.json").read_text())
    data["residscope_position_embedding"] = "none"
    (folder / "config.json").write_text(json.dumps(data))
    model = load_model(folder, load_tokenizer=False)
    with pytest.raises(InputError, match="RoPE"):
        model.set_dual_chunk_attention(8, 2)


def test_config_turns_it_on(tmp_path, ids):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = save_hf(transformers.Qwen2ForCausalLM(cfg), tmp_path / "q")
    data = json.loads((folder / "config.json").read_text())
    data["dual_chunk_attention_config"] = {"chunk_size": 12, "local_size": 4, "original_max_position_embeddings": 16}
    (folder / "config.json").write_text(json.dumps(data))
    model = load_model(folder, dtype="float64", load_tokenizer=False)
    assert model.dual_chunk_settings() == [DualChunk(12, 4, 16)] * 2
    ref_z, _ = reference_dca(model, ids, DualChunk(12, 4, 16))
    _, cache = model.run_with_cache(ids, names_filter="blocks.0.attn.hook_z")
    torch.testing.assert_close(cache["blocks.0.attn.hook_z"], ref_z, rtol=1e-10, atol=1e-10)
    with model.positional_overrides():
        model.set_dual_chunk_attention(None)
        assert model.dual_chunk_settings() == [None, None]
    assert model.dual_chunk_settings() == [DualChunk(12, 4, 16)] * 2
    data["dual_chunk_attention_config"] = {"chunk_size": 4, "local_size": 4}
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="dual_chunk_attention_config"):
        load_model(folder, load_tokenizer=False)


def test_extension_method(tiny, ids):
    from residscope.analyses.extension import METHODS, apply_method

    assert "dca" in METHODS
    before = tiny(ids)
    with apply_method(tiny, "dca", 2.0, window=16) as ext:
        assert ext.settings["chunk_size"] == 12 and ext.settings["local_size"] == 2
        assert tiny.dual_chunk_settings() == [DualChunk(12, 2)] * 2
        torch.testing.assert_close(tiny(ids[:, :10]), before[:, :10], rtol=1e-12, atol=1e-12)  # inside one chunk
    assert tiny.dual_chunk_settings() == [None, None]


def test_window_and_padding_refused(tiny, ids):
    with tiny.positional_overrides():
        tiny.set_dual_chunk_attention(12, 4)
        with pytest.raises(InputError, match="window"):
            tiny.set_window(8)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        with pytest.raises(InputError, match="attention_mask"):
            tiny(ids, attention_mask=mask)
    with tiny.positional_overrides():
        tiny.set_window(8)
        with pytest.raises(InputError, match="layers.*sliding window"):
            tiny.set_dual_chunk_attention(12, 4)


@pytest.mark.parametrize("offset", [None, 0, 3])
def test_attend_with_lse_fused_and_explicit_agree(offset):
    from residscope.model.dca import _explicit_with_lse, attend_with_lse

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for n in (5, 8 if offset else 5, 8 if offset else 5))
    out, lse = attend_with_lse(q, k, v, 0.3, causal_offset=offset)
    scores = (q @ k.transpose(-1, -2)) * 0.3
    if offset is not None:
        allowed = torch.arange(k.shape[-2])[None, :] <= torch.arange(5)[:, None] + offset
        scores = scores.masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1))
    torch.testing.assert_close(out, scores.softmax(-1) @ v)
    mask = None if offset is None else torch.zeros(scores.shape[-2:], dtype=q.dtype).masked_fill(~allowed, float("-inf"))
    out2, lse2 = _explicit_with_lse(q, k, v, 0.3, mask, block=3)
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(lse2, lse)
