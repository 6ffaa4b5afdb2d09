"""What only the GPT-lineage families have (GPT-2, GPT-NeoX, GPT-J, GPT-Neo, OPT, BLOOM): their config options and
refusals, checkpoints saved without transformers' base-model prefix or with Pythia's old names, padding through learned
positions and ALiBi, TransformerLens facts (cfg fields, tl_parameters, logit_lens, exact logit attribution), the RoPE
bound over the rotated dimensions only, and block streaming. The generic checks (parity, analyses, export) run on every
case in tests/test_families.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from family_zoo import CASES, VOCAB  # imports family_cases_gpt (a direct import first would be circular)
from residscope.analyses.rope_bound import model_bounds
from residscope.model import load_model
from residscope.model.config import DecoderConfig
from residscope.model.errors import ConfigError


def ids(batch=2, seq=20, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case id -> (transformers model, checkpoint folder), built on first use."""
    cache = {}

    def get(case):
        if case not in cache:
            hf = CASES[case]()
            folder = tmp_path_factory.mktemp(case) / "ckpt"
            hf.save_pretrained(folder)
            cache[case] = hf, folder
        return cache[case]
    return get


def _config(case) -> dict:
    return CASES[case]().config.to_dict()


# ---- config options and refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, key, value", [
    ("gpt2", "scale_attn_by_inverse_layer_idx", True),
    ("bloom", "apply_residual_connection_post_layernorm", True),
])
def test_options_residscope_does_not_compute_are_refused_by_name(case, key, value):
    cfg = {**_config(case), key: value}
    with pytest.raises(ConfigError, match=f"config.json: unsupported option {key}"):
        DecoderConfig.from_hf(cfg)


def test_bloom_pretraining_tp_without_slow_but_exact_changes_nothing():
    cfg = {**_config("bloom"), "pretraining_tp": 4}
    assert DecoderConfig.from_hf(cfg).positional == "alibi"
    with pytest.raises(ConfigError, match="slow_but_exact"):
        DecoderConfig.from_hf({**cfg, "slow_but_exact": True})


def test_option_fields():
    neox, serial = DecoderConfig.from_hf(_config("gpt_neox")), DecoderConfig.from_hf(_config("gpt_neox-serial"))
    assert neox.parallel and not serial.parallel and neox.rotary_dim == 4 and serial.rotary_dim == 8
    assert neox.rotary_base == 1000 and not neox.rotary_adjacent_pairs
    gptj = DecoderConfig.from_hf(_config("gptj"))
    assert gptj.shared_norm and gptj.parallel and gptj.rotary_dim == 8 and gptj.rotary_adjacent_pairs and gptj.unembed_bias
    neo = DecoderConfig.from_hf(_config("gpt_neo"))
    assert neo.attn_types == ["global", "local", "local"] and neo.window_size == 6 and neo.scale == 1.0
    opt, post = DecoderConfig.from_hf(_config("opt")), DecoderConfig.from_hf(_config("opt-postln"))
    assert opt.pos_offset == 2 and opt.final_norm and not opt.residual_norm and opt.d_embed is None
    assert post.residual_norm and not post.final_norm and post.d_embed == 32
    assert DecoderConfig.from_hf({**_config("opt"), "_remove_final_layer_norm": True}).final_norm is False
    bloom = DecoderConfig.from_hf(_config("bloom"))
    assert bloom.embed_norm and bloom.positional_embedding_type == "alibi" and bloom.n_heads == 6


def test_pythia_legacy_config_keys():
    """Pythia's config.json predates rope_parameters: rotary_pct and rotary_emb_base."""
    cfg = {k: v for k, v in _config("gpt_neox").items() if k != "rope_parameters"}
    cfg.update(rotary_pct=0.5, rotary_emb_base=500)
    parsed = DecoderConfig.from_hf(cfg)
    assert parsed.rotary_dim == 8 and parsed.rotary_base == 500


def test_gpt_neo_layer_kinds_as_transformers_reads_them():
    """A saved config lists attention_layers, which transformers sets after expanding attention_types: it wins."""
    cfg = {**_config("gpt_neo"), "attention_types": [[["local"], 3]]}
    assert DecoderConfig.from_hf(cfg).attn_types == ["global", "local", "local"]
    del cfg["attention_layers"]
    assert DecoderConfig.from_hf(cfg).attn_types == ["local"] * 3
    with pytest.raises(ConfigError, match="attention_types"):
        DecoderConfig.from_hf({**cfg, "attention_types": [[["global", "local"], 2]]})


# ---- checkpoints as the hub ships them --------------------------------------------------------------------------------
@pytest.mark.parametrize("case, prefix", [("gpt2", "transformer."), ("opt", "model."), ("bloom", "transformer.")])
def test_checkpoints_saved_without_the_base_model_prefix_load(saved, tmp_path, case, prefix):
    """openai-community/gpt2, facebook/opt-125m and bigscience/bloom-560m name tensors without transformers'
    base_model_prefix ("h.0.attn.c_attn.weight"); they load, and export writes the prefixed names back."""
    hf, folder = saved(case)
    state = load_file(folder / "model.safetensors")
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({k.removeprefix(prefix): v for k, v in state.items()}, str(bare / "model.safetensors"))
    (bare / "config.json").write_text((folder / "config.json").read_text())
    ours = load_model(bare)
    tokens = ids()
    with torch.no_grad():
        assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)
    out = ours.save_pretrained(tmp_path / "out")
    assert all(k.startswith(prefix) or k.startswith("lm_head") for k in load_file(out / "model.safetensors"))


def test_pythia_embed_out_name_loads(saved, tmp_path):
    hf, folder = saved("gpt_neox")
    state = load_file(folder / "model.safetensors")
    old = tmp_path / "old"
    old.mkdir()
    save_file({("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in state.items()},
              str(old / "model.safetensors"))
    (old / "config.json").write_text((folder / "config.json").read_text())
    tokens = ids()
    with torch.no_grad():
        assert_close(load_model(old)(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


# ---- padding: OPT's positions and BLOOM's ALiBi come from the attention mask -------------------------------------------
@pytest.mark.parametrize("case", ["opt", "bloom", "gpt_neox", "gpt_neo", "gpt2"])
def test_left_padded_batch_equals_transformers(saved, case):
    """residscope counts positions over real tokens (a padded row equals the unpadded sequence), as OPT's and BLOOM's
    forward do and as transformers' generate does for the others (their bare forward counts from the padding: given the
    same position_ids here)."""
    hf, folder = saved(case)
    ours = load_model(folder)
    tokens = ids()
    mask = torch.ones_like(tokens)
    mask[1, :6] = 0
    kw = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if case in ("gpt_neo", "gpt2") else {}
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, **kw).logits
        got = ours(tokens, attention_mask=mask)
    assert_close(got[0], ref[0], atol=1e-4, rtol=1e-4)
    assert_close(got[1, 6:], ref[1, 6:], atol=1e-4, rtol=1e-4)  # padded positions' outputs are unused


# ---- TransformerLens ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, prepend_bos, act_fn, pos_type", [
    ("gpt2", True, "gelu_new", "standard"), ("gpt_neox", False, "gelu", "rotary"), ("gptj", True, "gelu_new", "rotary"),
    ("gpt_neo", True, "gelu_new", "standard"), ("opt", True, "relu", "standard"), ("bloom", False, "gelu_pytorch_tanh", "alibi"),
])
def test_transformer_lens_cfg_facts(case, prepend_bos, act_fn, pos_type):
    cfg = DecoderConfig.from_hf(_config(case))
    assert cfg.default_prepend_bos is prepend_bos
    assert cfg.act_fn == act_fn and cfg.positional_embedding_type == pos_type and cfg.normalization_type == "LN"
    assert cfg.parallel_attn_mlp is (case in ("gpt_neox", "gptj")) and not cfg.gated_mlp


@pytest.mark.parametrize("case", ["gpt2", "opt-postln", "bloom"])
def test_tl_parameters_and_plain_mlp_weights(saved, case):
    ours = load_model(saved(case)[1])
    cfg = ours.cfg
    params = ours.tl_parameters()
    assert dict(ours.tl_named_parameters()).keys() == params.keys()
    assert params["blocks.0.attn.W_Q"].shape == (cfg.n_heads, cfg.d_model, cfg.d_head)
    assert params["blocks.1.mlp.W_in"].shape == (cfg.d_model, cfg.d_mlp)
    assert torch.equal(params["blocks.1.mlp.W_in"], ours.blocks[1].mlp.up_proj.weight.T)
    assert "blocks.0.mlp.W_gate" not in params and ours.W_gate is None and ours.blocks[0].mlp.W_gate is None
    assert torch.equal(params["unembed.W_U"], ours.W_U) and torch.equal(params["blocks.0.ln1.b"], ours.blocks[0].ln1.bias)
    if cfg.positional == "learned":
        assert torch.equal(params["pos_embed.W_pos"], ours.W_pos) and ours.W_pos.shape == (cfg.n_ctx, cfg.d_model)


@pytest.mark.parametrize("case", ["gpt2", "opt-postln", "gptj"])
def test_cache_logit_lens(saved, case):
    """TransformerLens 4.3's ActivationCache.logit_lens: its last entry is the model's own logits (through ln_final, the
    OPT-350m projection folded into W_U, GPT-J's lm_head bias)."""
    ours = load_model(saved(case)[1])
    tokens = ids()
    logits, cache = ours.run_with_cache(tokens)
    lens = cache.logit_lens(positions=None)
    assert lens.labels[-1] == "final_post" and lens.values.shape == (ours.cfg.n_layers + 1, 2, 20, VOCAB)
    assert_close(lens.values[-1], logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["gpt2", "gpt_neox", "bloom"])
def test_logit_attribution_is_exact_up_to_the_final_norm_bias(saved, case):
    """residscope does not fold ln_final into W_U: the attributions of a full decomposition (through the cached final
    scale and the directions carrying ln_final's gain) sum to the logit minus the constant ln_final.b @ W_U + b_U that
    TransformerLens would have folded into b_U."""
    ours = load_model(saved(case)[1])
    tokens = ids()
    logits, cache = ours.run_with_cache(tokens)
    stack = cache.decompose_resid(pos_slice=-1, return_labels=False)  # [component, batch, d_model]
    answer = tokens[:, -1]
    attrs = cache.logit_attrs(stack, tokens=answer, incorrect_tokens=None, pos_slice=-1)  # [component, batch]
    constant = (ours.ln_final.bias @ ours.W_U + ours.b_U)[answer]  # [batch]
    assert_close(attrs.sum(0) + constant, logits[torch.arange(2), -1, answer], atol=1e-4, rtol=1e-4)


# ---- RoPE bound: rotated dimensions only --------------------------------------------------------------------------------
def test_rope_bound_uses_the_rotated_dimensions_only():
    from residscope.analyses.rope_bound import context_bound
    from residscope.model.rope import inv_freq

    cfg = DecoderConfig.from_hf(_config("gpt_neox"))  # rotary_pct 0.25: 4 of 16 dimensions rotate
    (kind,) = model_bounds(cfg, max_m=2000)
    assert kind.rotary_dim == 4 and kind.bound.n_freqs == 2
    freq, _ = inv_freq(cfg.rope["full_attention"], cfg.d_head, dtype=torch.float64)
    assert kind.bound == context_bound(inv_freq=freq, max_m=2000)


# ---- block streaming -------------------------------------------------------------------------------------------------
def test_offloaded_gpt_neox_is_bit_exact(saved):
    """Fused per-head query_key_value tensors are split as the blocks stream from disk."""
    _, folder = saved("gpt_neox")
    plain, streamed = load_model(folder), load_model(folder, offload=True)
    assert all(p.device.type == "meta" for p in streamed.blocks.parameters())
    tokens = ids()
    with torch.no_grad():
        assert torch.equal(streamed(tokens), plain(tokens))


# ---- GGUF: the GPT-lineage architectures transformers' GGUF loader reads (gpt2, bloom; gptneox: test_gguf_archs) -----
def _write_gguf(path, hf, arch: str, params: dict) -> None:
    """`hf` as llama.cpp's convert_hf_to_gguf.py writes it: tensor names from gguf.TensorNameMap, GPT-2's Conv1D weights
    transposed to [out, in], BLOOM's per-head query_key_value regrouped into [q; k; v] rows, a byte-level BPE vocabulary
    (its size is the model's), lm_head written out as `output`."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    c = hf.config
    n_head, d = c.num_attention_heads, c.hidden_size
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    for key, value in params.items():
        getattr(w, f"add_{key}")(value)
    tokens = list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    assert len(tokens) == c.vocab_size
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.GPT2 if arch == "gpt2" else gguf.MODEL_ARCH.BLOOM, c.num_hidden_layers)
    state = hf.state_dict()
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = hf.lm_head.weight
    for key, tensor in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        base, suffix = key.rsplit(".", 1)
        name = names.get_name(base) or names.get_name(base.removeprefix("transformer."))
        data = tensor.detach().float().numpy()
        if arch == "gpt2" and name.endswith(("attn_qkv", "attn_output", "ffn_up", "ffn_down")) and suffix == "weight":
            data = data.T
        if arch == "bloom" and name.endswith("attn_qkv"):
            per_head = data.reshape(n_head, 3, d // n_head, *data.shape[1:])
            data = np.concatenate([per_head[:, p].reshape(d, *data.shape[1:]) for p in range(3)])
        w.add_tensor(f"{name}.{suffix}", np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
def test_gguf_files_load_equal_to_the_model_written(tmp_path, monkeypatch, arch):
    from transformers import BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel

    from family_zoo import randomize

    monkeypatch.setenv("RESIDSCOPE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    if arch == "gpt2":  # n_positions as transformers' GGUF reader leaves it (it reads context_length into n_ctx)
        hf = randomize(GPT2LMHeadModel(GPT2Config(vocab_size=260, n_embd=32, n_layer=2, n_head=4, n_positions=1024)))
        params = dict(context_length=1024, embedding_length=32, feed_forward_length=128, head_count=4,
                      layer_norm_eps=1e-5)
    else:
        hf = randomize(BloomForCausalLM(BloomConfig(vocab_size=260, hidden_size=48, n_layer=2, n_head=6)))
        params = dict(context_length=2048, embedding_length=48, feed_forward_length=192, head_count=6,
                      head_count_kv=6, layer_norm_eps=1e-5)
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(path, hf, arch, params)
    ours = load_model(path)
    assert ours.cfg.model_type == arch
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_offloaded_pruned_gpt2_exports_to_transformers(saved, tmp_path):
    """Streamed export (model/streamed_export.py) copies GPT-2's transposed Conv1D and fused c_attn tensors as stored,
    renumbering the kept layers; transformers reloads the result with the pruned model's logits."""
    from transformers import AutoModelForCausalLM

    from residscope.surgery import remove_layers

    _, folder = saved("gpt2")
    streamed = remove_layers(load_model(folder, offload=True), [1])
    out = streamed.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    plain = remove_layers(load_model(folder), [1])
    tokens = ids()
    with torch.no_grad():
        assert_close(reloaded(tokens).logits, plain(tokens), atol=1e-4, rtol=1e-4)


# ---- options the generic cases leave at their defaults -----------------------------------------------------------------
@pytest.mark.parametrize("case, options", [
    ("gpt2", dict(scale_attn_weights=False, reorder_and_upcast_attn=True, activation_function="relu")),
    ("gpt_neox", dict(attention_bias=False, rotary_emb_base=50.0)),
    ("gptj", dict(rotary_dim=16)),  # the whole head
    ("opt", dict(enable_bias=False, _remove_final_layer_norm=True)),
    ("opt", dict(layer_norm_elementwise_affine=False)),
    ("gpt_neo", dict(attention_types=[[["local"], 3]], attention_layers=["local"] * 3, window_size=3)),
])
def test_options_equal_transformers(tmp_path, case, options):
    from transformers import AutoConfig, AutoModelForCausalLM

    from family_zoo import randomize

    config = AutoConfig.for_model(**{**_config(case), **options})
    torch.manual_seed(0)
    hf = randomize(AutoModelForCausalLM.from_config(config))
    hf.save_pretrained(tmp_path / "ckpt")
    tokens = ids()
    with torch.no_grad():
        assert_close(load_model(tmp_path / "ckpt")(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)
