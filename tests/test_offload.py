"""Block-streamed execution (`load_model(..., offload=True)`): the same analyses through the same functions give the
in-memory results (logits bit-exact in the same dtype, scores within 1e-6), with at most two blocks in memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from conftest import byte_tokenizer, randomize_norms
from residscope.analyses.perplexity import perplexity
from residscope.analyses.positional import attention_statistics, decompose_positions
from residscope.analyses.runner import forward_batches
from residscope.model import load_model
from residscope.model.errors import CheckpointError
from residscope.surgery import block_influence_result

N_LAYERS = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg)
    randomize_norms(hf)
    folder = tmp_path_factory.mktemp("offload") / "ckpt"
    hf.save_pretrained(folder, max_shard_size="60KB")  # several shards: blocks are spread over files
    byte_tokenizer().save_pretrained(folder)
    return folder


def batches():
    data = list(torch.randint(0, 300, (6, 20), generator=torch.Generator().manual_seed(0)).split(2))
    mask = torch.ones_like(data[1])
    mask[1, :7] = 0  # left padding in one batch
    return data, [data[0], (data[1], mask), data[2]]


@pytest.mark.parametrize("activations", ["device", "cpu"])
def test_streamed_logits_are_bit_exact(ckpt, activations):
    plain, streamed = load_model(ckpt), load_model(ckpt, offload=True)
    streamed.offload.activations = activations
    assert all(p.device.type == "meta" for p in streamed.blocks.parameters())  # blocks stay on disk
    _, mixed = batches()
    ref = [r.output for r in forward_batches(plain, mixed, progress=False)]
    got = [r.output for r in forward_batches(streamed, mixed, progress=False)]
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    assert all(p.device.type == "meta" for p in streamed.blocks.parameters())  # and are freed after use
    assert streamed.offload.stats.read_bytes > 0


def test_streamed_analyses_equal_in_memory(ckpt):
    plain, streamed = load_model(ckpt), load_model(ckpt, offload=True)
    data, mixed = batches()
    for compat in (False, True):
        a = block_influence_result(plain, mixed, shortgpt_compat=compat, progress=False)
        b = block_influence_result(streamed, mixed, shortgpt_compat=compat, progress=False)
        torch.testing.assert_close(b.scores, a.scores, rtol=0, atol=1e-6)
        assert a.n_tokens == b.n_tokens
    for metric in ("attn-bi", "mlp-bi"):
        torch.testing.assert_close(block_influence_result(streamed, mixed, metric, progress=False).scores,
                                   block_influence_result(plain, mixed, metric, progress=False).scores, rtol=0, atol=1e-6)
    assert perplexity(streamed, mixed, progress=False).nll == pytest.approx(perplexity(plain, mixed, progress=False).nll,
                                                                            rel=1e-6)
    da, db = decompose_positions(plain, data, progress=False), decompose_positions(streamed, data, progress=False)
    torch.testing.assert_close(db.vectors, da.vectors, rtol=0, atol=1e-6)
    sa, sb = attention_statistics(plain, data, progress=False), attention_statistics(streamed, data, progress=False)
    torch.testing.assert_close(torch.from_numpy(sb.sink_mass), torch.from_numpy(sa.sink_mass), rtol=0, atol=1e-6)


def test_user_hooks_fire_under_the_same_names(ckpt):
    """A hook attached by the caller (here: zeroing one block's MLP output) changes both paths the same way."""
    plain, streamed = load_model(ckpt), load_model(ckpt, offload=True)
    data, _ = batches()
    zero = [("blocks.2.hook_mlp_out", lambda x, hook: torch.zeros_like(x))]
    outs = []
    for m in (plain, streamed):
        with m.hooks(fwd_hooks=zero):
            outs.append(perplexity(m, data, progress=False).nll)
    assert outs[0] == pytest.approx(outs[1], rel=1e-6)
    assert abs(outs[0] - perplexity(plain, data, progress=False).nll) > 1e-5  # the hook did change something


def test_pickled_checkpoint_refused(tmp_path, ckpt):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((ckpt / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: offload=True \(--offload\) streams safetensors checkpoints only"):
        load_model(folder, offload=True)
