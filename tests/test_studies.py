"""The study functions the CLI, the explorer and the notebooks share: each one against the loop it replaced."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.testing import assert_close

from conftest import byte_tokenizer
from residscope.analyses import extension as ext
from residscope.analyses.logit_lens import logit_lens
from residscope.analyses.perplexity import perplexity
from residscope.analyses.positional_study import positional_study
from residscope.model import load_model
from residscope.surgery import (BASELINES, METRICS, block_influence_result, compare_removals, influence_results,
                                removal_order, remove_layers)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("studies") / "tiny"
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return load_model(folder)


def batches(n=2, seq=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, seq), generator=gen) for _ in range(n)]


def test_one_pass_gives_bi_angular_and_relative_magnitude(tiny):
    calib = batches()
    results = influence_results(tiny, calib, ["bi", "angular", "relative-magnitude", "attn-bi"], progress=False)
    for metric, result in results.items():
        direct = block_influence_result(tiny, calib, metric, progress=False)
        assert result.metric == metric
        assert_close(result.scores, direct.scores, rtol=0, atol=0)
    assert_close(results["bi"].score("angular"), results["angular"].scores, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs its own pass"):
        results["bi"].score("mlp-bi")


def test_compare_removals_matches_removing_and_scoring_each_choice(tiny):
    calib, held_out = batches(seed=0), batches(seed=1)
    cmp = compare_removals(tiny, 1, held_out, calibration_batches=calib, seeds=3)
    assert [r.method for r in cmp.rows] == [*METRICS, "sequential", "reverse", "random (mean of 3)"]
    assert cmp.dense.ppl == perplexity(tiny, held_out, progress=False).ppl
    bi = block_influence_result(tiny, calib, "bi", progress=False)
    assert cmp.rows[0].removed == removal_order(bi, 1)
    assert cmp.rows[0].ppl == perplexity(remove_layers(tiny, removal_order(bi, 1)), held_out, progress=False).ppl
    randoms = [perplexity(remove_layers(tiny, removal_order("random", 1, n_layers=4, seed=s)), held_out,
                          progress=False).ppl for s in range(3)]
    assert cmp.rows[-1].removed is None and cmp.rows[-1].ppls == randoms and cmp.rows[-1].ppl_std is not None
    with pytest.raises(ValueError, match="calibration_batches"):
        compare_removals(tiny, 1, held_out, methods=["bi"])
    with pytest.raises(ValueError, match="n_remove"):
        compare_removals(tiny, 4, held_out, methods=list(BASELINES))


def test_logit_lens_last_block_reads_the_final_logits(tiny):
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    lens = logit_lens(tiny, ids)
    with torch.inference_mode():
        logits = tiny(ids)[0].float()  # [pos, vocab]
    assert lens.top_ids.shape == (4, 9) and lens.top_probs.shape == (4, 9)
    assert_close(lens.logits, logits)
    assert torch.equal(lens.top_ids[-1], logits.argmax(-1))  # the last block's output is what the model reads out
    assert_close(lens.target_probs[-1], lens.top_probs[-1])
    with pytest.raises(ValueError, match="one sequence"):
        logit_lens(tiny, torch.zeros(2, 3, dtype=torch.long))


def test_extension_settings_are_the_defaults_of_every_study(tiny):
    assert ext.extension_settings(tiny, "pi", [64, 256]) == (4.0, {})
    assert ext.extension_settings(tiny, "pi", [32]) == (1.0, {})  # never below 1
    assert ext.extension_settings(tiny, "pv-replace", [64, 128], factor=3) == (3.0, {"max_length": 128})
    assert ext.extension_settings(tiny, "pv-replace", [64], method_kw={"max_length": 99})[1] == {"max_length": 99}
    assert ext.method_options("window", window=32, logit_scale=1.2, ratio=2.0) == {"logit_scale": 1.2}
    assert ext.method_options("yarn", window=32, ratio=2.0) == {"window": 32}
    assert ext.method_options("pv-replace", window=32, layer=1, samples=8) == {"window": 32, "layer": 1, "samples": 8}
    assert ext.method_options("none", window=32) == {}
    with pytest.raises(ValueError, match="factor"):
        ext.extension_settings(tiny, "pi", [64], factor=0.5)


def test_passkey_study_is_the_loop_over_methods():
    zoo = load_model("zoo-rope")
    kw = dict(n_keys=1, seed=7, progress=False)
    rows = ext.passkey_study(zoo, ["none", "pi"], [128, 256], [0.5], **kw)
    expected = []
    for method in ("none", "pi"):
        with ext.apply_method(zoo, method, 2.0) as e:
            expected += ext.passkey_accuracy(zoo, [128, 256], [0.5], method=method, ext=e, **kw)
    assert rows == expected


def test_positional_study_runs_the_removal_settings_on_held_out_text(tiny):
    study = positional_study(tiny, batches(seq=16), first_k=2, remove_layers=[1, 3], eval_batches=batches(seed=3),
                             progress=False)
    assert [r.label for r in study.removal] == ["original", "remove at 1 (all positions)", "remove at 3 (all positions)",
                                                "remove at 1 (first 2)", "remove at 3 (first 2)"]
    summary = study.summary()
    assert len(summary["positional"]["positional_share"]) == 5 and len(summary["removal"]) == 5
    with pytest.raises(ValueError, match="eval_batches"):
        positional_study(tiny, batches(), remove_layers=[1])
