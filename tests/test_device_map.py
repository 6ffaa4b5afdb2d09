"""Layers across devices: the pure planner, the device_map parser's one-line errors, and a model placed by a map of CPU
placements (hooks, cache, KV cache, Block Influence) equal to the plain model. Nothing here runs on a GPU."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import byte_tokenizer, randomize_norms
from residscope.analyses.perplexity import perplexity
from residscope.model import load_model
from residscope.model.device_map import parse_device_map, plan_device_map
from residscope.surgery import block_influence


# ---- planner ---------------------------------------------------------------------------------------------------------
def test_plan_fills_devices_in_order():
    assert plan_device_map([10] * 4, {"cuda:0": 25, "cuda:1": 100}) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]


def test_plan_counts_embedding_with_first_block_and_unembedding_with_last():
    assert plan_device_map([10] * 4, {"a": 25, "b": 100}, embed_bytes=6) == ["a", "b", "b", "b"]
    # the last block moves on when the unembedding would not fit beside it
    assert plan_device_map([10] * 3, {"a": 30, "b": 100}, unembed_bytes=5) == ["a", "a", "b"]


def test_plan_keeps_blocks_contiguous_and_refuses_what_does_not_fit():
    plan = plan_device_map([5, 20, 5, 6], {"a": 10, "b": 30, "c": 10})
    assert plan == ["a", "b", "b", "c"]
    with pytest.raises(ValueError, match=r"^device_map: the model does not fit"):
        plan_device_map([10] * 4, {"a": 15, "b": 15})


# ---- parsing and bad input ---------------------------------------------------------------------------------------------
def test_parse_ranges():
    assert parse_device_map({"blocks.0-1": "cpu", "blocks.2": "cpu"}, 3) == ["cpu"] * 3


@pytest.mark.parametrize("spec, message", [
    ({"blocks.0-1": "cpu"}, "device_map: block 2 is not placed (nor 1 more)"),
    ({"blocks.0-3": "cpu", "blocks.3": "cpu"}, "device_map: block 3 is placed twice ('cpu' and 'cpu')"),
    ({"blocks.0-3": "cuda:7"}, "device_map: device 'cuda:7' is not available on this machine"),
    ({"layers.0-3": "cpu"}, "device_map: key 'layers.0-3' is not 'blocks.I' or 'blocks.I-J'"),
    ({"blocks.0-9": "cpu"}, "device_map: 'blocks.0-9' is outside blocks 0..3"),
])
def test_bad_maps_are_one_line_errors(spec, message):
    with pytest.raises(ValueError) as e:
        parse_device_map(spec, 4)
    assert str(e.value) == message


# ---- a placed model equals the plain one ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(cfg)
    randomize_norms(hf)
    folder = tmp_path_factory.mktemp("device_map") / "ckpt"
    hf.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_cpu_placements_equal_plain_forward(ckpt):
    plain = load_model(ckpt)
    placed = load_model(ckpt, device_map={"blocks.0-1": "cpu", "blocks.2-3": "cpu"})
    assert placed.device_plan == ["cpu"] * 4
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    assert torch.equal(placed(ids, attention_mask=mask), plain(ids, attention_mask=mask))
    logits_a, cache_a = plain.run_with_cache(ids)
    logits_b, cache_b = placed.run_with_cache(ids)
    assert torch.equal(logits_a, logits_b) and set(cache_a.keys()) == set(cache_b.keys())
    for name in cache_a.keys():
        assert torch.equal(cache_a[name], cache_b[name]), name
    assert torch.equal(placed.generate(ids, 5), plain.generate(ids, 5))  # KV cache
    assert torch.equal(block_influence(placed, [ids], progress=False), block_influence(plain, [ids], progress=False))
    assert perplexity(placed, [(ids, mask)], progress=False).nll == perplexity(plain, [(ids, mask)], progress=False).nll


def test_auto_map_on_a_cpu_machine(ckpt):
    assert load_model(ckpt, device_map="auto").device_plan == ["cpu"] * 4


def test_device_map_errors_name_the_argument(ckpt):
    with pytest.raises(ValueError, match=r"^device_map: block 3 is not placed$"):
        load_model(ckpt, device_map={"blocks.0-2": "cpu"})
    with pytest.raises(ValueError, match=r"^offload and device_map: choose one"):
        load_model(ckpt, device_map="auto", offload=True)


# ---- device-agnostic: every parameter on `meta` ------------------------------------------------------------------------
@pytest.fixture
def meta_model(ckpt):
    from residscope.model import load_config
    from residscope.model.decoder import Decoder

    with torch.device("meta"):
        return Decoder(load_config(ckpt))


def test_meta_model_runs_forward_cache_kv_and_analysis_hooks(meta_model):
    """A tensor made on the wrong device (CPU by default) would fail to mix with `meta` ones."""
    from residscope.analyses.positional import PositionalDecomposition, removal_hooks, resid_hook_names
    from residscope.model.decoder import KVCache

    m = meta_model
    ids = torch.zeros(2, 10, dtype=torch.long)  # token ids are data (meta ids are refused); everything after is meta
    assert m(ids).shape == (2, 10, 300) and m(ids).device.type == "meta"
    _, cache = m.run_with_cache(ids)
    assert {v.device.type for v in cache.values()} == {"meta"}
    kv = KVCache()
    m(ids, kv_cache=kv)
    assert m(ids[:, :1], kv_cache=kv).shape == (2, 1, 300)
    # the hook points Block Influence and the positional decomposition read
    seen = []
    names = resid_hook_names(4) + [f"blocks.{i}.hook_resid_mid" for i in range(4)] + ["ln_final.hook_normalized"]
    hooks = [(n, lambda x, hook: seen.append((hook.name, x.device.type))) for n in names]
    assert m.run_with_hooks(ids, fwd_hooks=hooks).device.type == "meta"
    assert {d for _, d in seen} == {"meta"} and {n for n, _ in seen} == set(names)
    # positional interventions: deltas built on the CPU must follow the residual stream to its device
    dec = PositionalDecomposition(vectors=torch.randn(5, 10, 32, dtype=torch.float64), second_moment=torch.ones(5, 10),
                                  mean_token_norm=torch.ones(5, 10), n_samples=1)
    with m.hooks(fwd_hooks=removal_hooks(dec, [1, 3])):
        assert m(ids).device.type == "meta"


def test_unpadded_forward_keeps_sdpa_fused_eligible(ckpt, monkeypatch):
    """No padding, no cache: attention runs as `is_causal` SDPA without a mask (what CUDA's fused kernels need), also
    under a device map."""
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    for model in (load_model(ckpt), load_model(ckpt, device_map={"blocks.0-1": "cpu", "blocks.2-3": "cpu"})):
        calls.clear()
        model(ids)
        assert calls == [(True, True)] * 4
