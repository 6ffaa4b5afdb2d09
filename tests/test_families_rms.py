"""What only one of the RMSNorm families does (tests/family_cases_rms.py holds their tiny cases; tests/test_families.py
runs parity, the TransformerLens surface, the analyses and export on all of them):

- config readers agree with transformers' own config classes on every default and legacy key;
- options residscope does not compute are refused in one line naming the file and key;
- the roundings OLMo 2/3 and Granite place differently from Llama are the ones transformers computes (bf16, bitwise);
- Granite: per-head results and exact logit attribution with the residual multiplier and biases;
- SmolLM3: NoPE layers are visible to the positional analyses, refused by set_rope, cut right on export;
- Phi-3: the RoPE bound over the rotated dims only, and LongRoPE generation across the switch equals transformers';
- TransformerLens's default_prepend_bos per architecture.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoConfig

from family_zoo import CASES, VOCAB
from residscope.model import ConfigError, DecoderConfig, InputError, load_model
from residscope.model.config import FULL, SLIDING
from residscope.model.families import FAMILIES

MINE = ("qwen3", "gemma", "gemma2", "phi3", "olmo2", "olmo3", "granite", "smollm3")
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def ours_and_theirs(model_type: str, **keys) -> tuple[DecoderConfig, object]:
    """(residscope's reading, transformers' reading) of the same config.json dict."""
    raw = {"model_type": model_type, **TINY, **keys}
    return DecoderConfig.from_hf(dict(raw)), AutoConfig.for_model(**raw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case id -> (transformers model, checkpoint folder), built once per case on first use."""
    made = {}

    def get(case: str):
        if case not in made:
            hf = CASES[case]()
            folder = tmp_path_factory.mktemp(case) / "ckpt"
            hf.save_pretrained(folder)
            made[case] = hf, folder
        return made[case]

    return get


def ids(batch=2, seq=20, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---- config readers ----------------------------------------------------------------------------------------------------
def test_defaults_of_keys_left_out_follow_the_config_classes():
    qwen3, hf = ours_and_theirs("qwen3")  # no head_dim: Qwen3Config's 128, not hidden_size / heads
    assert qwen3.d_head == hf.head_dim == 128 and qwen3.qk_norm == "head"
    gemma, hf = ours_and_theirs("gemma", hidden_act="gelu")  # the released configs' "gelu" is the tanh form
    assert hf.hidden_act == "gelu_pytorch_tanh" and gemma.act == "gelu_tanh" and gemma.d_head == hf.head_dim == 256
    gemma2, hf = ours_and_theirs("gemma2")
    assert (gemma2.attn_softcap, gemma2.final_softcap) == (hf.attn_logit_softcapping, hf.final_logit_softcapping)
    assert gemma2.scale == hf.query_pre_attn_scalar**-0.5 and gemma2.sliding_window == hf.sliding_window
    assert gemma2.layer_types == hf.layer_types and gemma2.tie_embeddings == hf.tie_word_embeddings
    off, hf = ours_and_theirs("gemma2", attn_logit_softcapping=None, final_logit_softcapping=None)
    assert off.attn_softcap is off.final_softcap is hf.attn_logit_softcapping is hf.final_logit_softcapping is None
    for model_type in ("phi3", "olmo2", "olmo3"):  # rms_norm_eps 1e-5 there, 1e-6 in Llama
        cfg, hf = ours_and_theirs(model_type)
        assert cfg.norm_eps == hf.rms_norm_eps
    smol, hf = ours_and_theirs("smollm3", num_hidden_layers=8)  # NoPE every 4th layer
    assert [0 if i in smol.no_rope else 1 for i in range(8)] == hf.no_rope_layers and smol.tie_embeddings
    olmo3, hf = ours_and_theirs("olmo3", num_hidden_layers=8)
    assert olmo3.layer_types == hf.layer_types and olmo3.sliding_window == hf.sliding_window


def test_legacy_rope_keys_read_as_transformers_reads_them():
    # OLMo 3: a top-level rope_theta and rope_scaling reach the full-attention layers only
    olmo3, hf = ours_and_theirs("olmo3", rope_theta=10_000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    for kind in (FULL, SLIDING):
        assert olmo3.rope[kind].theta == hf.rope_parameters[kind]["rope_theta"]
        assert olmo3.rope[kind].rope_type == hf.rope_parameters[kind]["rope_type"]
    assert olmo3.rope[SLIDING].theta == 500_000.0 and olmo3.rope[FULL].factor == 2.0
    # Phi-3: "su" is LongRoPE's old name; the top-level original_max_position_embeddings wins over the block's
    factors = {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    phi3, hf = ours_and_theirs("phi3", original_max_position_embeddings=32,
                               rope_scaling={"type": "su", "original_max_position_embeddings": 8, **factors})
    rope = phi3.rope[FULL]
    assert rope.rope_type == hf.rope_parameters["rope_type"] == "longrope"
    assert rope.original_max_position_embeddings == hf.rope_parameters["original_max_position_embeddings"] == 32
    partial, hf = ours_and_theirs("phi3", partial_rotary_factor=0.5)
    assert partial.rotary_dim == int(16 * hf.rope_parameters["partial_rotary_factor"]) == 8


def test_options_residscope_does_not_compute_are_refused_naming_the_key(tmp_path):
    bad = {
        "phi3": ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type"),
        "smollm3": ({"no_rope_layers": [1, 0]}, "no_rope_layers"),
        "gemma2": ({"sliding_window": None}, "sliding_window"),
        "qwen3": ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        "granite": ({"residual_multiplier": -1.0}, "residual_multiplier"),
        "olmo3": ({"layer_types": [FULL, SLIDING]}, "layer_types"),
    }
    for model_type, (keys, key) in bad.items():
        path = tmp_path / model_type / "config.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"model_type": model_type, **TINY, **keys}))
        with pytest.raises(ConfigError) as err:
            DecoderConfig.from_json(path)
        message = str(err.value)
        assert "\n" not in message and key in message, message
        assert str(path) in message or "layer_types" in message, message


# ---- roundings ---------------------------------------------------------------------------------------------------------
def test_olmo_norm_multiplies_its_weight_before_rounding(saved):
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    from residscope.model.decoder import RMSNorm

    theirs = Olmo2RMSNorm(64, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        theirs.weight.copy_(torch.rand(64) + 0.5)
    x = torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 3
    out = {}
    for wide in (True, False):
        ours = RMSNorm(64, 1e-5, wide_gain=wide).to(torch.bfloat16)
        ours.load_state_dict(theirs.state_dict())
        out[wide] = ours(x)
    assert torch.equal(out[True], theirs(x))
    assert not torch.equal(out[False], theirs(x))  # Llama's order rounds first: the field is what makes it exact
    assert load_model(saved("olmo2")[1]).cfg.norm_wide_gain


def test_olmo_rope_rotates_with_float32_cos_sin(saved):
    """In bf16, q/k after RoPE (hook_rot_q / hook_rot_k) are what transformers' OLMo 2 rotation computes from the same
    q/k: float32 cos/sin, the product rounded once."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RotaryEmbedding, apply_rotary_pos_emb

    hf, folder = saved("olmo2")
    model = load_model(folder, dtype=torch.bfloat16)
    assert model.cfg.rope_wide
    tokens = ids(batch=1)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: "blocks.1.attn.hook_" in n)
    q, k = cache["blocks.1.attn.hook_q"].transpose(1, 2), cache["blocks.1.attn.hook_k"].transpose(1, 2)
    cos, sin = Olmo2RotaryEmbedding(hf.config)(q, torch.arange(tokens.shape[1])[None])
    assert cos.dtype == torch.float32
    rot_q, rot_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(cache["blocks.1.attn.hook_rot_q"], rot_q.transpose(1, 2))
    assert torch.equal(cache["blocks.1.attn.hook_rot_k"], rot_k.transpose(1, 2))


def test_granite_embedding_multiplier_is_not_rounded_to_bf16_first(saved):
    hf, folder = saved("granite")
    assert hf.config.embedding_multiplier == 3.7  # not a bf16 number: rounding it first would show
    model = load_model(folder, dtype=torch.bfloat16)
    tokens = ids()
    _, cache = model.run_with_cache(tokens, names_filter="hook_embed")
    with torch.no_grad():
        reference = hf.to(torch.bfloat16)(tokens, output_hidden_states=True).hidden_states[0]
    hf.float()
    assert torch.equal(cache["hook_embed"], reference)


# ---- Granite: residual multiplier in per-head results and logit attribution ----------------------------------------------
def test_granite_head_results_and_logit_attribution_are_exact(saved):
    model = load_model(saved("granite")[1], dtype=torch.float64)
    scale = model.cfg.residual_scale
    assert scale not in (None, 1.0) and model.cfg.o_bias and model.cfg.mlp_bias
    tokens = ids()
    plain, cache = model.run_with_cache(tokens)
    # TransformerLens rebuilds head results as z @ W_O times _result_contribution_scale, neurons as post @ W_out times
    # residual_contribution_scale: both sum (with the scaled biases) to what the block adds to the stream
    heads = cache.stack_head_results().view(model.cfg.n_layers, model.cfg.n_heads, *tokens.shape, -1)
    assert_close(heads.sum(1) + scale * model.b_O[:, None, None], cache.stack_activation("attn_out"), atol=1e-10, rtol=0)
    neurons = cache.get_neuron_results(1)  # [batch, pos, d_mlp, d_model]
    assert_close(neurons.sum(-2) + scale * model.blocks[1].mlp.b_out, cache["mlp_out", 1], atol=1e-10, rtol=0)
    # the opt-in hook_result carries the multiplier too, and computes the same model
    model.set_use_attn_result(True)
    logits, cache_r = model.run_with_cache(tokens)
    assert_close(logits, plain, atol=1e-10, rtol=0)
    assert_close(cache_r.stack_head_results(), cache.stack_head_results(), atol=1e-10, rtol=0)
    # direct logit attribution over heads, neurons, embedding and biases sums to the logit difference
    right, wrong = logits[:, -1].argmax(-1), logits[:, -1].argmin(-1)
    stack = cache_r.get_full_resid_decomposition(expand_neurons=True, pos_slice=-1)
    attrs = cache_r.logit_attrs(stack, tokens=right, incorrect_tokens=wrong, pos_slice=-1)  # [component, batch]
    diff = logits[:, -1].gather(-1, right[:, None])[:, 0] - logits[:, -1].gather(-1, wrong[:, None])[:, 0]
    assert_close(attrs.sum(0), diff, atol=1e-9, rtol=1e-9)
    model.set_use_attn_result(False)


# ---- SmolLM3: NoPE layers -------------------------------------------------------------------------------------------------
def test_nope_layers_are_visible_to_positional_tools(saved, tmp_path):
    from residscope.analyses.extension import applicable_methods, _scale_rope
    from residscope.analyses.rope_bound import model_bounds
    from residscope.surgery import remove_layers

    model = load_model(saved("smollm3")[1])
    nope = list(model.cfg.no_rope)
    assert nope == [1, 3]
    ropes = model.rope_settings()
    assert [i for i, r in enumerate(ropes) if r is None] == nope
    with pytest.raises(InputError, match=r"\[1\].*NoPE"):
        model.set_rope(theta=5e5, layers=[1])
    bounds = model_bounds(model.cfg)
    assert sorted(i for b in bounds for i in b.layers) == [0, 2]  # NoPE layers have no bound
    assert "pi" in applicable_methods(model)
    with model.positional_overrides():
        _scale_rope(model, "pi", 2.0, 16)
        assert [r is None for r in model.rope_settings()] == [r is None for r in ropes]
    # removing a NoPE layer cuts no_rope_layers and layer_types, so transformers reads the same model back
    cut = remove_layers(model, [1])
    assert cut.cfg.no_rope == (2,)
    config = json.loads((cut.save_pretrained(tmp_path / "cut") / "config.json").read_text())
    assert config["no_rope_layers"] == [1, 1, 0] and config["layer_types"] == [FULL, FULL, SLIDING]


def test_rope_bound_page_and_command_name_the_nope_layers(saved):
    from typer.testing import CliRunner

    from residscope.apps.cli import app

    folder = saved("smollm3")[1]
    out = CliRunner().invoke(app, ["rope-bound", "--model", str(folder)])
    assert out.exit_code == 0, out.output
    assert "layers [1, 3] apply no rotary position (NoPE)" in out.output and "2 layers" in out.output


# ---- Phi-3: partial rotary and LongRoPE -----------------------------------------------------------------------------------
def test_rope_bound_of_partial_rotary_uses_the_rotated_dims_only():
    from residscope.analyses.rope_bound import context_bound, model_bounds

    cfg, _ = ours_and_theirs("phi3", partial_rotary_factor=0.5, rope_theta=500.0)
    (kind,) = model_bounds(cfg, max_m=1 << 16)
    assert (kind.head_dim, kind.rotary_dim) == (16, 8)
    # the 4 rotated pairs at base^(-2i/8): the bound of a head of 8 dims, not of 16 with 4 pairs that never turn
    assert kind.bound == context_bound(500.0, 8, max_m=1 << 16)
    assert kind.bound.bound != context_bound(500.0, 16, max_m=1 << 16).bound


def test_longrope_generation_across_the_switch_equals_transformers(saved):
    """Phi-3's LongRoPE switches to the long factors once the sequence passes original_max_position_embeddings (16
    here); transformers' generation then recomputes the whole sequence, and so does residscope's."""
    hf, folder = saved("phi3-longrope")
    model = load_model(folder)
    prompt = ids(batch=1, seq=12, seed=3)
    steps = []  # tokens each forward of the generation runs through the blocks
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: steps.append(x.shape[1]))]):
        ours = model.generate(prompt, max_new_tokens=8, stop_at_eos=False)
    assert steps == [12, 1, 1, 1, 1, 17, 1, 1]  # the step that reaches 17 tokens recomputes them all
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, model.generate(prompt, max_new_tokens=8, stop_at_eos=False, use_past_kv_cache=False))


# ---- TransformerLens facts ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MINE)
def test_prepend_bos_is_transformer_lens_default_for_the_architecture(model_type):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory

    family = FAMILIES[model_type]
    tl_cfg = TransformerBridgeConfig(d_model=64, d_head=16, n_layers=2, n_ctx=64, d_vocab=VOCAB, n_heads=4,
                                     architecture=family.architecture)
    adapter = ArchitectureAdapterFactory.select_architecture_adapter(tl_cfg)
    assert family.prepend_bos == adapter.cfg.default_prepend_bos


@pytest.mark.parametrize("case", ["gemma2", "olmo2", "qwen3", "phi3-partial-window", "smollm3"])
def test_transformer_lens_cfg_fields_are_true_for_the_family(case, saved):
    cfg = load_model(saved(case)[1]).cfg
    facts = {
        "gemma2": dict(rmsnorm_uses_offset=True, use_normalization_before_and_after=True, use_qk_norm=False,
                       attn_scores_soft_cap=3.0, output_logits_soft_cap=2.0, use_local_attn=True, window_size=6),
        "olmo2": dict(rmsnorm_uses_offset=False, use_normalization_before_and_after=False, use_qk_norm=True),
        "qwen3": dict(use_qk_norm=True, rotary_dim=24, attn_scores_soft_cap=-1.0),
        "phi3-partial-window": dict(rotary_dim=8, use_local_attn=True, window_size=7, rotary_adjacent_pairs=False),
        "smollm3": dict(positional_embedding_type="rotary", use_local_attn=True, window_size=6, rotary_dim=16),
    }[case]
    assert {k: getattr(cfg, k) for k in facts} == facts
    assert cfg.normalization_type == "RMS" and cfg.gated_mlp and cfg.original_architecture == FAMILIES[cfg.model_type].architecture


@pytest.mark.slow
def test_explorer_rope_page_on_nope_and_partial_rotary_models(saved):
    from test_explorer import assert_clean, run_app

    at = run_app(str(saved("smollm3")[1]), "rope")
    assert_clean(at)
    assert any("Layers [1, 3] apply no rotary position" in c.value for c in at.caption)
    at = run_app(str(saved("phi3-partial-window")[1]), "rope")
    assert_clean(at)
    assert at.number_input(key="rope_head_dim").value == 8  # the rotated dims, not the head's 16
