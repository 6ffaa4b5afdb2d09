"""gpt-oss beyond the generic family battery (tests/test_families.py runs it on the cases of family_cases_moe.py):
attention sinks on every attention path against a float64 reference written out here, the clamped SwiGLU with the
clamps biting, the top-k-then-softmax router and forced experts, YaRN as transformers builds it from the config
defaults, the fused interleaved expert tensors, expert pruning and its export, and the refusal of MXFP4 checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from family_zoo import CASES, VOCAB
from residscope.model import ConfigError, DecoderConfig, load_model
from residscope.model.attention_chunks import chunked_patterns
from residscope.model.rope import rope_cos_sin


def ids(batch=2, seq=20, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    hf = CASES["gpt_oss"]()
    folder = tmp_path_factory.mktemp("gpt_oss") / "ckpt"
    hf.save_pretrained(folder)
    return hf, load_model(folder), folder


def reference_attention(q, k, v, sinks, scale, window, key_valid=None):
    """gpt-oss attention written out in float64: q [batch, head, q, d] (the last q rows of the k keys), k / v
    [batch, head, k, d] (heads repeated), softmax over [scores, sink] with the sink column dropped."""
    q, k, v, sinks = q.double(), k.double(), v.double(), sinks.double()
    nq, nk = q.shape[-2], k.shape[-2]
    qi = torch.arange(nk - nq, nk)[:, None]
    kj = torch.arange(nk)[None, :]
    allowed = (kj <= qi) & ((kj > qi - window) if window else True)
    allowed = allowed[None, None] if key_valid is None else allowed[None, None] & key_valid[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    full = torch.cat((scores, sinks[None, :, None, None].expand(*scores.shape[:-1], 1)), dim=-1).softmax(-1)
    pattern = full[..., :-1]
    return pattern @ v, pattern


def _qkv(cache, layer, n_rep):
    q = cache[f"blocks.{layer}.attn.hook_rot_q"].transpose(1, 2)
    k = cache[f"blocks.{layer}.attn.hook_rot_k"].transpose(1, 2).repeat_interleave(n_rep, dim=1)
    v = cache[f"blocks.{layer}.attn.hook_v"].transpose(1, 2).repeat_interleave(n_rep, dim=1)
    return q, k, v


def test_sinks_sdpa_explicit_and_float64_reference_agree(gpt_oss):
    _, _, folder = gpt_oss
    m = load_model(folder, dtype=torch.float64)
    tokens = ids()
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding in the second row
    for attention_mask in (None, mask):
        names = lambda n: any(n.endswith(s) for s in ("hook_rot_q", "hook_rot_k", "hook_v", "hook_z"))  # noqa: E731
        fast, cache = m.run_with_cache(tokens, attention_mask=attention_mask, names_filter=names)
        slow, explicit = m.run_with_cache(tokens, attention_mask=attention_mask,
                                          names_filter=lambda n: names(n) or n.endswith("hook_pattern"))
        assert_close(slow, fast, atol=1e-10, rtol=1e-10)
        for layer in range(m.cfg.n_layers):
            attn = m.blocks[layer].attn
            q, k, v = _qkv(cache, layer, attn.n_rep)
            z, pattern = reference_attention(q, k, v, attn.sinks, attn.scale, attn.window,
                                             None if attention_mask is None else attention_mask.bool())
            rows = slice(None) if attention_mask is None else (slice(None), slice(None), slice(3, None))
            for got in (cache, explicit):  # SDPA path, explicit path
                assert_close(got[f"blocks.{layer}.attn.hook_z"].transpose(1, 2)[rows], z[rows], atol=1e-12, rtol=1e-10)
            assert_close(explicit[f"blocks.{layer}.attn.hook_pattern"][rows], pattern[rows], atol=1e-12, rtol=1e-10)
            assert (pattern[rows].sum(-1) < 0.99).all()  # the sinks hold real mass
    assert m.blocks[0].attn.window == 7 and m.blocks[1].attn.window is None


def test_sinks_in_kv_cache_decoding_and_chunked_patterns(gpt_oss):
    _, m, _ = gpt_oss
    from residscope.model.decoder import KVCache

    tokens = ids(batch=1, seq=20)
    full = m(tokens)
    cache = KVCache()
    first = m(tokens[:, :15], kv_cache=cache)
    steps = [m(tokens[:, t:t + 1], kv_cache=cache) for t in range(15, 20)]  # q_len 1 against a windowed cache
    assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=1e-5)
    blocks = {}
    with chunked_patterns(m, {1: lambda b, row: blocks.setdefault(row, b.clone())}, rows=6):
        chunked = m(tokens)
    assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    _, cache = m.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    pattern = cache["blocks.1.attn.hook_pattern"]
    for row, block in blocks.items():
        assert_close(block, pattern[..., row:row + block.shape[-2], :block.shape[-1]])


def test_long_context_entropy_counts_the_learned_sink(gpt_oss):
    from residscope.analyses.long_context import long_context_statistics

    _, m, _ = gpt_oss
    tokens = ids(batch=1, seq=20)
    stats = long_context_statistics(m, [tokens], first_k=2, rows=8, progress=False)
    _, cache = m.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    p = cache["blocks.1.attn.hook_pattern"].double()[0]  # [head, q, k]
    sink = 1 - p.sum(-1)
    entropy = -(torch.special.xlogy(p, p).sum(-1) + torch.special.xlogy(sink, sink))  # [head, q]
    assert_close(torch.as_tensor(stats.entropy[1]), entropy.mean(-1), atol=1e-5, rtol=1e-5)
    q = torch.arange(20, dtype=torch.float64)
    distance = (p * (q[:, None] - q[None, :])).sum(-1)
    assert_close(torch.as_tensor(stats.mean_distance[1]), distance.mean(-1), atol=1e-4, rtol=1e-5)


def test_dual_chunk_attention_keeps_the_sinks(gpt_oss):
    _, m, _ = gpt_oss
    tokens = ids(batch=1, seq=20)
    with m.positional_overrides():
        m.set_dual_chunk_attention(8, 2, layers=[1])
        fast = m(tokens)
        slow, _ = m.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_bfloat16_is_bitwise_transformers(tmp_path):
    """transformers' gpt-oss eager arithmetic in bf16: softmax with the sink in bf16 after the row max is subtracted,
    expert biases added after the matmul. Weights rounded to bf16 first, so both load the same numbers (transformers
    keeps the norms' weights in float32)."""
    from transformers import AutoModelForCausalLM

    hf = CASES["gpt_oss"]()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    hf.save_pretrained(tmp_path / "bf16")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    hf.set_experts_implementation("eager")
    m = load_model(tmp_path / "bf16", dtype=torch.bfloat16)
    tokens = ids()
    with torch.no_grad():
        ref = hf(tokens).logits
        assert torch.equal(m(tokens), ref)
        hooked, _ = m.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
        assert torch.equal(hooked, ref)


def test_clamped_swiglu_bites_and_matches_transformers(gpt_oss):
    hf, m, _ = gpt_oss
    tokens = ids()
    _, cache = m.run_with_cache(tokens, names_filter="blocks.0.ln2.hook_normalized")
    x = cache["blocks.0.ln2.hook_normalized"]  # [batch, pos, d_model]
    moe = m.blocks[0].mlp
    limit = m.cfg.swiglu_limit
    gate = torch.stack([moe.experts[e].gate_proj(x) for e in range(6)])
    up = torch.stack([moe.experts[e].up_proj(x) for e in range(6)])
    assert limit == 0.3 and (gate > limit).float().mean() > 0.05 and (up.abs() > limit).float().mean() > 0.05
    with torch.no_grad():
        ref, _ = hf.model.layers[0].mlp(x)
        assert_close(moe(x), ref, atol=1e-6, rtol=1e-5)
        for e in moe.experts:
            e.limit = None  # plain SwiGLU: a different layer
        try:
            assert not torch.allclose(moe(x), ref, atol=1e-3)
        finally:
            for e in moe.experts:
                e.limit = limit


def test_router_topk_then_softmax_and_forced_experts(gpt_oss):
    _, m, _ = gpt_oss
    tokens = ids()
    _, cache = m.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.2.mlp.hook_"))
    logits = cache["blocks.2.mlp.hook_router_logits"]
    idx, w = cache["blocks.2.mlp.hook_expert_indices"], cache["blocks.2.mlp.hook_expert_weights"]
    top = logits.topk(2, dim=-1)
    assert torch.equal(idx, top.indices)
    assert_close(w, top.values.softmax(-1), atol=0, rtol=0)
    assert m.blocks[2].mlp.router.bias is not None

    def force(x, hook):
        x[...] = torch.tensor([5, 0])
        return x

    seen = {}
    m.run_with_hooks(tokens, fwd_hooks=[("blocks.2.mlp.hook_expert_indices", force),
                                        ("blocks.2.mlp.hook_expert_weights", lambda x, hook: seen.setdefault("w", x.clone()))])
    assert_close(seen["w"], logits[..., [5, 0]].softmax(-1))


def test_expert_weights_in_transformer_lens_shapes(gpt_oss):
    hf, m, _ = gpt_oss
    moe = m.blocks[1].mlp
    fused = hf.model.layers[1].mlp.experts
    assert moe.W_gate.shape == (64, 6)
    e = moe.experts[4]
    assert e.W_in.shape == (64, 32) and e.W_gate.shape == (64, 32) and e.W_out.shape == (32, 64)
    assert torch.equal(e.W_gate, fused.gate_up_proj[4][:, ::2]) and torch.equal(e.W_in, fused.gate_up_proj[4][:, 1::2])
    assert torch.equal(e.b_gate, fused.gate_up_proj_bias[4][::2]) and torch.equal(e.b_in, fused.gate_up_proj_bias[4][1::2])
    assert torch.equal(e.W_out, fused.down_proj[4]) and torch.equal(e.b_out, fused.down_proj_bias[4])
    assert m.cfg.num_experts == 6 and m.cfg.experts_per_token == 2


def test_expert_analyses(gpt_oss):
    from residscope.analyses.experts import expert_attribution, routing_statistics

    _, m, _ = gpt_oss
    batches = [ids(seed=s) for s in range(2)]
    st = routing_statistics(m, batches, progress=False)
    assert st.layers == [0, 1, 2]
    assert_close(st.load.sum(-1), torch.ones(3, dtype=torch.float64))
    a = expert_attribution(m, batches, progress=False)
    assert a.shared is None  # no shared expert: the routed experts' attributions sum to the MLP's
    assert_close(a.per_expert.sum(-1), a.mlp_total, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("criterion", ["reap", "reconstruction"])
def test_expert_pruning_export_reloads_in_transformers(gpt_oss, tmp_path, criterion):
    from transformers import AutoModelForCausalLM

    from residscope.surgery.experts import choose_experts, expert_pruning_record, prune_experts

    _, m, _ = gpt_oss
    choice = choose_experts(m, [ids(seed=s) for s in range(2)], 3, criterion, progress=False)
    pruned = prune_experts(m, choice.keep)
    router = pruned.blocks[1].mlp.router
    kept = choice.keep[1]
    assert router.weight.shape == (3, 64) and torch.equal(router.bias, m.blocks[1].mlp.router.bias[kept])
    folder = pruned.save_pretrained(tmp_path / "out", pruning_info=expert_pruning_record(choice, pruned))
    config = json.loads((folder / "config.json").read_text())
    assert config["num_local_experts"] == 3 and "num_experts" not in config
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    hf.set_experts_implementation("eager")
    tokens = ids(seed=5)
    with torch.no_grad():
        assert_close(hf(tokens).logits, pruned(tokens), atol=1e-4, rtol=1e-4)
        assert hf.model.layers[1].mlp.router.bias.shape == (3,)
    assert_close(load_model(folder)(tokens), pruned(tokens), atol=0, rtol=0)


def test_config_defaults_are_transformers_and_yarn_matches():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    hf = GptOssConfig()  # gpt-oss-120b's shape; gpt-oss-20b: 24 layers, 32 experts
    raw = {k: v for k, v in hf.to_dict().items() if k not in ("rope_parameters",)}
    cfg = DecoderConfig.from_hf(raw)
    assert (cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_kv_heads, cfg.d_expert, cfg.d_vocab) == (2880, 64, 64, 8, 2880, 201088)
    assert (cfg.n_experts, cfg.experts_per_tok, cfg.sliding_window) == (128, 4, 128)
    assert cfg.layer_types[:2] == ["sliding_attention", "full_attention"] and cfg.swiglu_limit == 7.0
    rope = cfg.rope["full_attention"]
    assert (rope.rope_type, rope.theta, rope.factor, rope.truncate, rope.original_max_position_embeddings) == (
        "yarn", 150000.0, 32.0, False, 4096)
    positions = torch.tensor([[0, 1, 100, 4095, 4096, 70000]])
    cos, sin = GptOssRotaryEmbedding(hf)(torch.zeros(1, dtype=torch.float32), positions)  # [1, pos, d_head / 2]
    ours_cos, ours_sin = rope_cos_sin(rope, 64, positions)  # [1, pos, d_head]
    assert_close(ours_cos[..., :32], cos, atol=0, rtol=0) and assert_close(ours_sin[..., :32], sin, atol=0, rtol=0)
    assert float(cos[0, 0, 0]) > 1.3  # YaRN's attention factor 0.1 ln 32 + 1 scales cos and sin


def test_mxfp4_checkpoints_are_refused_in_one_line():
    from transformers import GptOssConfig

    raw = GptOssConfig(num_hidden_layers=2).to_dict()
    raw["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    with pytest.raises(ConfigError) as e:
        DecoderConfig.from_hf(raw)
    msg = str(e.value)
    assert "\n" not in msg and "MXFP4" in msg and "quantization_config" in msg and "dequantize" in msg


def test_bad_configs_are_one_line():
    from transformers import GptOssConfig

    raw = GptOssConfig(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2).to_dict()
    for change, culprit in (({"num_experts_per_tok": 5}, "num_experts_per_tok 5 > num_local_experts 4"),
                            ({"layer_types": ["sliding_attention", "local"]}, "layer_types"),
                            ({"swiglu_limit": -1.0}, "swiglu_limit"),
                            ({"sliding_window": 0}, "sliding_window")):
        with pytest.raises(ConfigError, match=culprit) as e:
            DecoderConfig.from_hf({**raw, **change})
        assert "\n" not in str(e.value)
    alias = {k: v for k, v in raw.items() if k != "num_local_experts"}
    assert DecoderConfig.from_hf({**alias, "num_experts": 4}).n_experts == 4
