"""Parity of the decoder with transformers (llama, qwen2, mistral) and the behaviour of hooks, masks, cache and knobs."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import randomize_norms, save_hf
from residscope.model import CheckpointError, ConfigError, KVCache, RopeParams, load_model

VOCAB = 97
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32, rope_theta=1000.0)

ROPE_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


def _pair(tmp_path, hf_cls, cfg, *, dtype=torch.float32):
    torch.manual_seed(0)
    hf = hf_cls(cfg).eval()
    randomize_norms(hf)
    folder = save_hf(hf, tmp_path)
    return hf.to(dtype), load_model(folder, dtype=dtype)


def _ids(batch=2, pos=40, seed=0):
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _assert_parity(hf, ours, ids, atol=1e-4):
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        logits, cache = ours.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_pre"))
    assert_close(logits, ref.logits, atol=atol, rtol=1e-4)
    for i in range(ours.cfg.n_layers):
        # transformers' hidden_states[i] is the input of block i (its last entry is the final-norm output instead)
        assert_close(cache[f"blocks.{i}.hook_resid_pre"], ref.hidden_states[i], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("scaling", list(ROPE_SCALINGS))
def test_llama_parity_every_rope_scaling(tmp_path, scaling):
    cfg = LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True, rope_scaling=ROPE_SCALINGS[scaling])
    hf, ours = _pair(tmp_path, LlamaForCausalLM, cfg)
    assert ours.cfg.n_rep == 2 and ours.cfg.rope_of(0).rope_type == scaling
    _assert_parity(hf, ours, _ids(pos=40))  # 40 > max positions 32: dynamic NTK rescales


def test_llama_head_dim_null_and_partial_config(tmp_path):
    cfg = LlamaConfig(**SMALL, head_dim=None)
    hf, ours = _pair(tmp_path, LlamaForCausalLM, cfg)
    assert ours.cfg.d_head == 16
    _assert_parity(hf, ours, _ids())


def test_qwen2_parity_qkv_bias_tied(tmp_path):
    cfg = Qwen2Config(**SMALL, tie_word_embeddings=True)
    hf, ours = _pair(tmp_path, Qwen2ForCausalLM, cfg)
    assert ours.cfg.qkv_bias and not ours.cfg.o_bias and ours.cfg.tie_embeddings
    assert ours.unembed.weight is ours.embed.weight
    _assert_parity(hf, ours, _ids())


def test_qwen2_sliding_window_only_on_upper_layers(tmp_path):
    cfg = Qwen2Config(**{**SMALL, "num_hidden_layers": 4}, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    hf, ours = _pair(tmp_path, Qwen2ForCausalLM, cfg)
    assert [ours.cfg.window_of(i) for i in range(4)] == [None, None, 8, 8]
    _assert_parity(hf, ours, _ids(pos=24))


def test_mistral_window_shorter_than_sequence(tmp_path):
    cfg = MistralConfig(**SMALL, sliding_window=8)
    hf, ours = _pair(tmp_path, MistralForCausalLM, cfg)
    assert ours.cfg.window_of(0) == 8
    _assert_parity(hf, ours, _ids(pos=30))
    # and the window really matters here: full attention gives different logits
    with torch.no_grad(), ours.positional_overrides():
        ours.set_window(None)
        assert not torch.allclose(ours(_ids(pos=30)), hf(_ids(pos=30)).logits, atol=1e-3)


@pytest.fixture
def llama(tmp_path):
    cfg = LlamaConfig(**SMALL, attention_bias=True)
    return _pair(tmp_path, LlamaForCausalLM, cfg)


def test_explicit_path_equals_sdpa(llama):
    _, ours = llama
    ids = _ids(pos=20)
    with torch.no_grad():
        fast = ours(ids)
        logits, cache = ours.run_with_cache(ids, names_filter=lambda n: "hook_pattern" in n or "hook_attn_scores" in n)
    assert_close(logits, fast, atol=1e-5, rtol=1e-5)
    pattern = cache["blocks.1.attn.hook_pattern"]  # [batch, head, q_pos, k_pos]
    assert pattern.shape == (2, 4, 20, 20)
    assert_close(pattern.sum(-1), torch.ones(2, 4, 20))
    assert torch.all(pattern.triu(1) == 0)  # causal
    assert cache["blocks.1.attn.hook_attn_scores"].shape == (2, 4, 20, 20)


def test_hook_shapes(llama):
    _, ours = llama
    with torch.no_grad():
        _, cache = ours.run_with_cache(_ids(pos=10))
    shapes = {
        "hook_embed": (2, 10, 64), "blocks.0.attn.hook_q": (2, 10, 4, 16), "blocks.0.attn.hook_k": (2, 10, 2, 16),
        "blocks.0.attn.hook_v": (2, 10, 2, 16), "blocks.0.attn.hook_rot_q": (2, 10, 4, 16),
        "blocks.0.attn.hook_rot_k": (2, 10, 2, 16), "blocks.0.attn.hook_z": (2, 10, 4, 16),
        "blocks.0.mlp.hook_pre": (2, 10, 96), "blocks.0.mlp.hook_post": (2, 10, 96), "blocks.2.hook_resid_post": (2, 10, 64),
        "blocks.2.hook_attn_out": (2, 10, 64), "blocks.2.hook_mlp_out": (2, 10, 64), "blocks.2.hook_resid_mid": (2, 10, 64),
        "ln_final.hook_normalized": (2, 10, 64),
    }
    for name, shape in shapes.items():
        assert tuple(cache[name].shape) == shape, name
    # resid_post of a block is resid_mid + mlp_out, and resid_mid is resid_pre + attn_out
    assert_close(cache["blocks.1.hook_resid_mid"], cache["blocks.1.hook_resid_pre"] + cache["blocks.1.hook_attn_out"])
    assert_close(cache["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_mid"] + cache["blocks.1.hook_mlp_out"])


def test_hook_that_edits_changes_output(llama):
    _, ours = llama
    ids = _ids(pos=12)
    with torch.no_grad():
        clean = ours(ids)
        zeroed = ours.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", lambda z, hook: torch.zeros_like(z))])
        again = ours(ids)  # hooks are removed afterwards
    assert not torch.allclose(clean, zeroed, atol=1e-3)
    assert_close(again, clean)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_rows(llama, side):
    hf, ours = llama
    short, long = _ids(1, 7, seed=1)[0], _ids(1, 12, seed=2)[0]
    pad = torch.zeros(5, dtype=torch.long)
    row = torch.cat((pad, short)) if side == "left" else torch.cat((short, pad))
    ids = torch.stack((row, long))
    mask = torch.ones_like(ids)
    if side == "left":
        mask[0, :5] = 0
    else:
        mask[0, 7:] = 0
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask)
        alone = ours(short[None])
        alone_long = ours(long[None])
        # transformers with the positions that count only real tokens gives the same numbers
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = hf(ids, attention_mask=mask, position_ids=positions).logits
    real = slice(5, 12) if side == "left" else slice(0, 7)
    assert_close(batched[0, real], alone[0], atol=1e-5, rtol=1e-5)
    assert_close(batched[1], alone_long[0], atol=1e-5, rtol=1e-5)
    assert_close(batched[0, real], ref[0, real], atol=1e-4, rtol=1e-4)


def test_kv_cache_logits_equal_full_forward(llama):
    _, ours = llama
    ids = _ids(2, 15)
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache()
        parts = [ours(ids[:, :6], kv_cache=cache), ours(ids[:, 6:7], kv_cache=cache), ours(ids[:, 7:], kv_cache=cache)]
    assert cache.length == 15
    assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_logits_to_keep_is_the_last_positions_logits(llama):
    _, ours = llama
    ids = _ids(2, 9)
    with torch.no_grad():
        assert_close(ours(ids, logits_to_keep=3), ours(ids)[:, -3:], atol=1e-6, rtol=1e-6)
    for bad, kind in ((0, "logits"), (True, "logits"), (2, "loss")):
        with pytest.raises(ValueError, match="logits_to_keep must be an int >= 1 with return_type='logits'"):
            ours(ids, return_type=kind, logits_to_keep=bad)


def test_generate_cache_equals_recompute_and_transformers(llama):
    hf, ours = llama
    prompt = _ids(2, 5)
    with torch.no_grad():
        cached = ours.generate(prompt, max_new_tokens=12, eos_token_id=[])
        recomputed = ours.generate(prompt, max_new_tokens=12, eos_token_id=[], use_cache=False)
        ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, ref)


def test_generate_left_padded_batch_matches_single(llama):
    _, ours = llama
    short, long = _ids(1, 4, seed=3), _ids(1, 7, seed=4)
    ids = torch.cat((torch.cat((torch.zeros(1, 3, dtype=torch.long), short), 1), long))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        both = ours.generate(ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[])
        one = ours.generate(short, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(both[0, 3:], one[0])


def test_sampling_is_seeded_and_restricted(llama):
    _, ours = llama
    prompt = _ids(1, 4)
    a = ours.generate(prompt, 8, do_sample=True, top_k=5, generator=torch.Generator().manual_seed(3), eos_token_id=[])
    b = ours.generate(prompt, 8, do_sample=True, top_k=5, generator=torch.Generator().manual_seed(3), eos_token_id=[])
    assert torch.equal(a, b)
    greedy = ours.generate(prompt, 8, eos_token_id=[])
    top1 = ours.generate(prompt, 8, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(5), eos_token_id=[])
    assert torch.equal(greedy, top1)


# ---- run-time positional knobs ------------------------------------------------------------------------------------
def test_set_rope_equals_model_trained_with_that_base(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    folder = save_hf(hf, tmp_path)
    other = LlamaForCausalLM(LlamaConfig(**{**SMALL, "rope_theta": 50_000.0})).eval()
    other.load_state_dict(hf.state_dict())
    ours = load_model(folder)
    ids = _ids()
    with torch.no_grad(), ours.positional_overrides():
        ours.set_rope(theta=50_000.0)
        assert_close(ours(ids), other(ids).logits, atol=1e-4, rtol=1e-4)
        ours.set_rope(RopeParams(theta=1000.0, rope_type="linear", factor=2.0))
        linear = ours(ids)
    assert ours.blocks[0].attn.rope.theta == 1000.0 and ours.blocks[0].attn.rope.rope_type == "default"  # restored
    assert not torch.allclose(linear, ours(ids), atol=1e-3)


def test_window_and_logit_scale_knobs(tmp_path):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    folder = save_hf(base, tmp_path)
    windowed = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=6)).eval()
    windowed.load_state_dict(base.state_dict())
    ours = load_model(folder)
    ids = _ids(pos=20)
    with torch.no_grad():
        ours.set_window(6)
        assert_close(ours(ids), windowed(ids).logits, atol=1e-4, rtol=1e-4)
        ours.reset_positional()
        # logit scale 1 is the identity; scaling by 2 equals doubling the query weights
        plain = ours(ids)
        ours.set_attn_logit_scale(2.0, layers=[1])
        scaled = ours(ids)
        ours.set_attn_logit_scale(1.0)
        q = ours.blocks[1].attn.q_proj
        q.weight.mul_(2)
        q.bias is not None and q.bias.mul_(2)
        doubled = ours(ids)
    assert not torch.allclose(plain, scaled, atol=1e-3)
    assert_close(scaled, doubled, atol=1e-5, rtol=1e-5)


def test_knob_errors(llama):
    _, ours = llama
    with pytest.raises(ValueError, match="layer 7 out of range"):
        ours.set_window(4, layers=[7])
    with pytest.raises(ValueError, match="window"):
        ours.set_window(0)
    with pytest.raises(ValueError, match="rope_type"):
        ours.set_rope(rope_type="longrope")


# ---- loading ------------------------------------------------------------------------------------------------------
def test_sharded_checkpoint_and_float64(tmp_path, hf_norms_in_float64):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    folder = save_hf(hf, tmp_path, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists()
    ours = load_model(folder, dtype=torch.float64)
    assert ours.dtype == torch.float64
    ids = _ids()
    with torch.no_grad():
        assert_close(ours(ids), hf.double()(ids).logits, atol=1e-10, rtol=1e-10)


def test_bfloat16_load(llama, tmp_path):
    hf, _ = llama
    folder = save_hf(hf, tmp_path, name="bf16")
    ours = load_model(folder, dtype="bfloat16")
    assert ours.dtype == torch.bfloat16 and ours.blocks[0].attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        ref = hf.to(torch.bfloat16)(_ids()).logits.float()
        assert_close(ours(_ids()).float(), ref, atol=0.05, rtol=0.05)


def test_tied_checkpoint_without_lm_head(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=True)).eval()
    folder = save_hf(hf, tmp_path)
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    _assert_parity(hf, load_model(folder), _ids())


def _broken(tmp_path, mutate_config=None, mutate_state=None):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    folder = save_hf(LlamaForCausalLM(LlamaConfig(**SMALL)), tmp_path)
    if mutate_config:
        cfg = json.loads((folder / "config.json").read_text())
        mutate_config(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    if mutate_state:
        state = load_file(folder / "model.safetensors")
        mutate_state(state)
        save_file(state, folder / "model.safetensors")
    return folder


def test_errors_name_the_file_or_key(tmp_path):
    with pytest.raises(CheckpointError, match="missing config.json"):
        (tmp_path / "empty").mkdir()
        load_model(tmp_path / "empty")
    folder = _broken(tmp_path / "a", mutate_state=lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(folder)
    folder = _broken(tmp_path / "b", mutate_state=lambda s: s.__setitem__("model.norm.weight", torch.ones(3)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has shape \(3,\), expected \(64,\)"):
        load_model(folder)
    folder = _broken(tmp_path / "c", mutate_state=lambda s: s.__setitem__("model.extra.weight", torch.ones(3)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.extra.weight'"):
        load_model(folder)
    folder = _broken(tmp_path / "d", mutate_config=lambda c: c.__setitem__("model_type", "mamba"))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported model_type 'mamba'"):
        load_model(folder)
    folder = _broken(tmp_path / "e", mutate_config=lambda c: c.__setitem__("rope_scaling", {"rope_type": "mrope", "factor": 2.0}))
    with pytest.raises(ConfigError, match="unsupported rope_type 'mrope'"):
        load_model(folder)
    folder = _broken(tmp_path / "f", mutate_config=lambda c: c.__setitem__("hidden_act", "mish"))
    with pytest.raises(ConfigError, match="unsupported hidden_act 'mish'"):
        load_model(folder)
    folder = _broken(tmp_path / "g", mutate_config=lambda c: c.pop("hidden_size"))
    with pytest.raises(ConfigError, match="missing key 'hidden_size'"):
        load_model(folder)
    with pytest.raises(ValueError, match="dtype 'int8' not supported"):
        load_model(folder, dtype="int8")


def test_pickles_refused_unless_opted_in(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    folder = save_hf(hf, tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickled checkpoint refused.*allow_pickle=True"):
        load_model(folder)
    _assert_parity(hf, load_model(folder, allow_pickle=True), _ids())


def test_load_does_not_materialise_random_init(tmp_path, monkeypatch):
    """Weights go straight into their parameters: no random initialisation pass runs on the real device."""
    import torch.nn.init as init

    torch.manual_seed(0)
    folder = save_hf(LlamaForCausalLM(LlamaConfig(**SMALL)), tmp_path)
    calls = []
    monkeypatch.setattr(init, "kaiming_uniform_", lambda t, *a, **k: calls.append(t.device) or t)
    load_model(folder)
    assert calls and all(d.type == "meta" for d in calls)


def test_truncated_safetensors_names_file_and_tensor(tmp_path):
    folder = _broken(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*' data is truncated"):
        load_model(folder)
    (folder / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a safetensors file"):
        load_model(folder)


PEAK_SCRIPT = """
import sys, torch
from residscope.model import Decoder, load_config, load_model
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
with torch.device("meta"):  # pay the one-off lazy imports of building a model before measuring
    Decoder(load_config(sys.argv[1]))
base = rss()
model = load_model(sys.argv[1], load_tokenizer=False)
size = sum(p.numel() * p.element_size() for p in model.parameters())
# VmHWM is this address space's peak; ru_maxrss would include the parent's peak, which survives fork + exec
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print((peak - base) / size)
"""


def test_peak_memory_while_loading_stays_near_model_size(tmp_path):
    """Weights are read into their parameters without an mmap or a second copy: peak RSS growth <= 1.3x the model."""
    import subprocess
    import sys

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=16000, hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4)
    folder = save_hf(LlamaForCausalLM(cfg), tmp_path)  # ~50 MB of float32
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(folder)], capture_output=True, text=True, check=True)
    ratio = float(out.stdout.strip().splitlines()[-1])
    assert ratio <= 1.3, f"peak memory while loading was {ratio:.2f}x the model's size"


def test_float64_explicit_path_equals_sdpa_exactly(tmp_path):
    """In float64 the explicit (pattern-hooked) path must not round through float32: a bug stays, rounding vanishes."""
    torch.manual_seed(0)
    folder = save_hf(LlamaForCausalLM(LlamaConfig(**SMALL)), tmp_path)
    ours = load_model(folder, dtype=torch.float64)
    ids = _ids(pos=20)
    with torch.no_grad():
        fast = ours(ids)
        hooked = ours.run_with_hooks(ids, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda p, hook: p)])
    assert_close(hooked, fast, atol=1e-12, rtol=1e-12)
