"""The Decoder API that analyses, surgery and apps use instead of attention internals, and every analysis on models
whose blocks lost their attention or MLP half."""

from __future__ import annotations

import math

import pytest
import torch

from residscope.analyses.extension import apply_method, passkey_accuracy, sliding_window_perplexity
from residscope.analyses.positional import attention_statistics, decompose_positions, describe_positions, removal_study
from residscope.analyses.rope_bound import model_bounds
from residscope.model import DecoderConfig, RopeParams, load_model
from residscope.model.decoder import Decoder
from residscope.probes.linear import collect_activations, position_probe
from residscope.surgery import block_influence, remove_layers, remove_sublayers, save_pretrained
from tiny_llama import MAX_POSITIONS, make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def ids_batch(model, n=2, length=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (n, length), generator=gen)


def test_removed_attention_then_rope_extension_does_not_crash(tiny):
    """The crash that motivated the API: apply_method read blocks[i].attn.rope directly."""
    model = remove_sublayers(tiny, attn=[0])
    ids = ids_batch(model)
    plain = model(ids)
    for method in ("pi", "ntk", "yarn"):
        with apply_method(model, method, 2):
            assert model.rope_settings()[0] is None
            assert all(r.theta != 10000.0 or r.rope_type != "default" for r in model.rope_settings()[1:])
            out = model(ids)
        assert torch.isfinite(out).all() and not torch.equal(out, plain)
    torch.testing.assert_close(model(ids), plain, atol=0, rtol=0)  # restored


def test_structure_queries_follow_surgery(tiny):
    assert tiny.attention_layers() == tiny.mlp_layers() == [0, 1, 2, 3]
    cut = remove_sublayers(tiny, attn=[1], mlp=[2])
    assert cut.attention_layers() == [0, 2, 3] and cut.mlp_layers() == [0, 1, 3]
    assert cut.cfg.removed_attn == (1,) and cut.cfg.removed_mlp == (2,)
    assert cut.windows() == [None] * 4 and cut.logit_scales() == [1.0, None, 1.0, 1.0]
    pruned = remove_layers(cut, [0])
    # removed halves are renumbered with the blocks; the origin is declared state, not a getattr default
    assert pruned.cfg.removed_attn == (0,) and pruned.cfg.removed_mlp == (1,)
    assert pruned.layer_origin == [1, 2, 3] and pruned.n_layers_original == 4 and tiny.layer_origin == [0, 1, 2, 3]
    assert pruned.source == tiny.source and tiny.source is not None


def test_config_with_removed_halves_builds_blocks_without_them():
    cfg = DecoderConfig(model_type="llama", n_layers=3, d_model=16, n_heads=2, n_kv_heads=1, d_head=8, d_mlp=32,
                        d_vocab=50, rope={"full_attention": RopeParams()}, removed_attn=(2,), removed_mlp=(0,))
    model = Decoder(cfg)
    assert model.blocks[2].attn is None and model.blocks[0].mlp is None and model.blocks[1].attn is not None
    assert not any(name.startswith("blocks.2.attn.") for name in model.hook_dict)
    with pytest.raises(ValueError, match="removed_attn"):
        cfg.replace(removed_attn=(3,))


def test_reset_positional_uses_each_blocks_own_defaults_after_removal(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                                          layer_types=["full_attention", "sliding_attention", "sliding_attention"]))
    hf.save_pretrained(tmp_path / "m")
    model = load_model(tmp_path / "m", load_tokenizer=False)
    assert model.windows() == [None, 8, 8]
    pruned = remove_layers(model, [0])
    pruned.set_window(None)
    pruned.set_rope(theta=123.0)
    pruned.reset_positional()
    assert pruned.windows() == [8, 8] and {r.theta for r in pruned.rope_settings()} == {model.rope_settings()[0].theta}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_positional_knobs_refuse_values_that_would_give_nan(tiny, bad):
    with pytest.raises(ValueError, match="theta"):
        tiny.set_rope(theta=bad)
    with pytest.raises(ValueError, match="scale"):
        tiny.set_attn_logit_scale(bad)
    assert tiny.rope_settings()[0].theta == 10000.0 and tiny.logit_scales() == [1.0] * 4


def test_save_pretrained_method_round_trip(tiny, tmp_path):
    cut = remove_sublayers(remove_layers(tiny, [1]), attn=[2])
    ids = ids_batch(tiny)
    with pytest.warns(UserWarning, match="residscope's own format"):
        out = cut.save_pretrained(tmp_path / "cut")
    again = load_model(out)
    assert again.cfg.removed_attn == (2,) and again.attention_layers() == [0, 1]
    torch.testing.assert_close(again(ids), cut(ids), atol=0, rtol=0)
    with pytest.raises(ValueError, match="not empty"):
        cut.save_pretrained(tmp_path / "cut")


@pytest.mark.parametrize("halves", [{"attn": [0, 2]}, {"mlp": [1, 3]}, {"attn": [1], "mlp": [1]}])
def test_every_analysis_runs_on_a_model_with_removed_halves(tiny, halves, tmp_path):
    model = remove_sublayers(tiny, **halves)
    batches = [ids_batch(model, 2, 32, seed) for seed in range(2)]
    for metric in ("bi", "angular", "relative-magnitude", "attn-bi", "mlp-bi"):
        scores = block_influence(model, batches, metric, progress=False)
        assert scores.shape == (4,) and torch.isfinite(scores).all()
        if metric == "attn-bi":
            assert all(abs(scores[i]) < 1e-6 for i in halves.get("attn", []))  # a missing half changes nothing (cos = 1)
        if metric == "mlp-bi":
            assert all(abs(scores[i]) < 1e-6 for i in halves.get("mlp", []))
    dec = decompose_positions(model, batches, progress=False)
    assert describe_positions(dec).first_token_ratio.shape[0] == 5
    att = attention_statistics(model, batches, progress=False)
    assert att.sink_mass.shape[0] == 4
    assert all((att.sink_mass[i] == 0).all() for i in halves.get("attn", []))  # no attention: no mass on sinks
    assert all((att.sink_mass[i] > 0).all() for i in model.attention_layers())
    rows = removal_study(model, dec, batches, [((1,), None)], progress=False)
    assert all(math.isfinite(r.ppl) for r in rows)
    acts = collect_activations(model, batches, layers=[1, 2], progress=False)
    assert position_probe(acts).score.shape[0] == 2
    tokens = ids_batch(model, 1, 300)[0]
    methods = ["none", "pi", "yarn", "pv-replace"]
    for method in methods:
        kw = dict(samples=4) if method == "pv-replace" else {}
        with apply_method(model, method, 2, **kw) as ext:
            ppl, *_ = sliding_window_perplexity(model, tokens, 2 * MAX_POSITIONS, progress=False)
            assert math.isfinite(ppl)
            if method == "none":
                assert passkey_accuracy(model, [200], [0.5], n_keys=1, ext=ext, progress=False)
    assert model_bounds(model.cfg)
    with pytest.warns(UserWarning, match="own format"):
        save_pretrained(model, tmp_path / "out")


def test_window_extension_on_model_with_removed_attention(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                                          max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "m")
    model = remove_sublayers(load_model(tmp_path / "m", load_tokenizer=False), attn=[0])
    with apply_method(model, "window", 2) as ext:
        assert model.windows() == [None, 16, 16] and ext.settings["layers"] == [1, 2]
    assert model.windows() == [None, 8, 8]
    only_mlps = remove_sublayers(model, attn=[1, 2])
    with pytest.raises(ValueError, match="no attention layer with RoPE"):
        with apply_method(only_mlps, "pi", 2):
            pass
    with pytest.raises(ValueError, match="sliding attention windows"):
        with apply_method(only_mlps, "window", 2):
            pass
