"""Perplexity: equal to transformers' causal-LM loss, streaming over batches, padding excluded, held-out split."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from conftest import byte_tokenizer
from residscope.analyses.perplexity import PerplexityResult, heldout_perplexity, perplexity
from residscope.model import load_model

VOCAB = 256




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("ppl") / "ckpt"
    hf.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return hf, load_model(folder)


def test_equals_transformers_loss(tiny):
    hf, model = tiny
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    r = perplexity(model, [ids], progress=False)
    with torch.no_grad():
        loss = hf(ids, labels=ids).loss.item()
    assert r.n_tokens == 3 * 19
    assert r.nll == pytest.approx(loss, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(loss), rel=1e-5)


def test_streaming_over_batches_equals_one_batch(tiny):
    _, model = tiny
    ids = torch.randint(0, VOCAB, (5, 16), generator=torch.Generator().manual_seed(2))
    one = perplexity(model, [ids], progress=False)
    many = perplexity(model, iter(ids.split(2)), progress=False)  # a generator: no len(), still fine
    assert many.n_tokens == one.n_tokens
    assert many.nll == pytest.approx(one.nll, rel=1e-6)


def test_padding_is_excluded(tiny):
    _, model = tiny
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, VOCAB, (1, 12), generator=gen), torch.randint(0, VOCAB, (1, 7), generator=gen)
    separate = perplexity(model, [a, b], progress=False)
    ids = torch.cat((a, torch.cat((b, torch.zeros(1, 5, dtype=torch.long)), dim=1)))  # right padding
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    padded = perplexity(model, [(ids, mask)], progress=False)
    assert padded.n_tokens == separate.n_tokens == 11 + 6
    assert padded.nll == pytest.approx(separate.nll, rel=1e-5)


def test_half_precision_is_scored_in_float32(tiny):
    _, model = tiny
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    ref = perplexity(model, [ids], progress=False)
    bf16 = perplexity(model.to(torch.bfloat16), [ids], progress=False)
    model.to(torch.float32)
    assert math.isfinite(bf16.nll) and bf16.nll == pytest.approx(ref.nll, rel=2e-2)


def test_heldout_uses_evaluation_split_and_text_files(tiny, tmp_path):
    _, model = tiny
    r = heldout_perplexity(model, seq_len=32, samples=4, batch_size=3, progress=False)
    assert isinstance(r, PerplexityResult) and r.n_tokens == 4 * 31
    assert "evaluation" in r.source and "4x32" in r.source
    text = tmp_path / "t.txt"
    text.write_text("The grass is green. The sky is blue. " * 20)
    f = heldout_perplexity(model, text_file=text, seq_len=16, samples=3, progress=False)
    assert "t.txt" in f.source and f.n_tokens == 3 * 15


def test_errors_name_the_argument(tiny, tmp_path):
    _, model = tiny
    with pytest.raises(ValueError, match="no predicted tokens"):
        perplexity(model, [], progress=False)
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        perplexity(model, [torch.zeros(5, dtype=torch.long)], progress=False)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        heldout_perplexity(model, text_file=tmp_path / "missing.txt", progress=False)
    with pytest.raises(ValueError, match="samples"):
        heldout_perplexity(model, seq_len=32, samples=10**6, progress=False)
