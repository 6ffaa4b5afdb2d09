"""Linear probes (probes/linear.py): synthetic activations with and without signal, and activation collection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from conftest import save_hf
from residscope.model import load_model
from residscope.probes.linear import (
    Activations,
    collect_activations,
    first_tokens_probe,
    fit_probe,
    position_probe,
    split_by_sample,
)

N_SAMPLES, SEQ, D = 40, 16, 24


def synthetic(seed: int = 0) -> Activations:
    """Layer 0: pure noise. Layer 1: log-position along one direction. Layer 2: a first-4-tokens flag along another."""
    rng = np.random.default_rng(seed)
    sample = np.repeat(np.arange(N_SAMPLES), SEQ)
    position = np.tile(np.arange(SEQ), N_SAMPLES)
    noise = lambda: rng.normal(size=(len(sample), D)).astype(np.float32)  # noqa: E731
    with_position = noise()
    with_position[:, 3] += 5.0 * np.log1p(position)  # R² ceiling about 0.92 against unit noise
    with_first = noise()
    with_first[:, 7] += 3.0 * (position < 4)
    return Activations(features={0: noise(), 1: with_position, 2: with_first}, sample=sample, position=position,
                       token=np.zeros(len(sample), dtype=int))


@pytest.fixture(scope="module")
def acts():
    return synthetic()


def test_split_is_by_sample(acts):
    train, test = split_by_sample(acts.sample, 0.25, seed=0)
    assert set(acts.sample[train]).isdisjoint(acts.sample[test])
    assert len(train) + len(test) == acts.n_tokens and len(set(acts.sample[test])) == 10


def test_position_probe_beats_control_only_where_signal_exists(acts):
    res = position_probe(acts, progress=False)
    assert res.metric == "r2" and res.layers == [0, 1, 2]
    assert res.score[1] > 0.8 and res.control[1] < 0.1
    assert res.score[0] < 0.05 and res.control[0] < 0.05  # pure noise: nothing to find
    assert res.control[2] < 0.05 < res.score[2] < res.score[1]  # the first-4 flag carries only part of log-position
    assert res.n_train + res.n_test == acts.n_tokens


def test_first_tokens_probe_beats_control_only_where_signal_exists(acts):
    res = first_tokens_probe(acts, k=4, progress=False)
    assert res.metric == "auc"
    assert res.score[2] > 0.95 and abs(res.control[2] - 0.5) < 0.15
    assert abs(res.score[0] - 0.5) < 0.15
    # log-position separates the first tokens as well: signal really exists at layer 1
    assert res.score[1] > 0.9
    assert set(res.to_dict()) >= {"target", "metric", "layers", "score", "control", "strength"}


def test_fit_probe_input_errors(acts):
    x, y = acts.features[0], np.zeros(acts.n_tokens, dtype=int)
    train, test = split_by_sample(acts.sample)
    with pytest.raises(ValueError, match="both classes"):
        fit_probe(x, y, train, test, task="classification", strength=1.0)
    with pytest.raises(ValueError, match="task"):
        fit_probe(x, y, train, test, task="ranking", strength=1.0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        split_by_sample(np.zeros(10))


def test_collect_activations_streams_whole_samples_under_a_cap(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = load_model(save_hf(transformers.LlamaForCausalLM(cfg), tmp_path), load_tokenizer=False)
    ids = torch.randint(0, 64, (7, 10), generator=torch.Generator().manual_seed(0))
    acts = collect_activations(model, ids.split(3), layers=[0, 2], max_tokens=45, progress=False)
    assert acts.layers == [0, 2] and acts.n_tokens == 45
    assert acts.sample.tolist() == np.repeat(np.arange(5), 10)[:45].tolist()
    assert acts.position.tolist() == np.tile(np.arange(10), 5)[:45].tolist()
    assert acts.token.tolist() == ids.reshape(-1)[:45].tolist()
    _, cache = model.run_with_cache(ids[:5], names_filter=["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"])
    np.testing.assert_array_equal(acts.features[0], cache["blocks.0.hook_resid_pre"].reshape(-1, 32)[:45].numpy())
    np.testing.assert_array_equal(acts.features[2], cache["blocks.1.hook_resid_post"].reshape(-1, 32)[:45].numpy())
    with pytest.raises(ValueError, match="layer 4 out of range"):
        collect_activations(model, ids.split(3), layers=[4], progress=False)
