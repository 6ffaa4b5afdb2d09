"""Block-streamed execution (`load_model(..., offload=True)`): the same analyses through the same functions give the
in-memory results (logits bit-exact in the same dtype, scores within 1e-6), with at most two blocks in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from conftest import byte_tokenizer, randomize_norms
from residscope.analyses.perplexity import perplexity
from residscope.analyses.positional import attention_statistics, decompose_positions
from residscope.runtime.runner import forward_batches
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


def test_plain_calls_on_an_offloaded_model_stream_one_batch(ckpt):
    """model(ids), run_with_cache, loss, stop_at_layer and generate work on an offloaded model as in memory, and the
    blocks go back to disk after each call, also when the call fails half-way."""
    plain, streamed = load_model(ckpt), load_model(ckpt, offload=True)
    ids = batches()[0][0]  # [2, 20]
    assert torch.equal(streamed(ids), plain(ids))
    logits, cache = streamed.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    expected, expected_cache = plain.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    assert torch.equal(logits, expected)
    assert torch.equal(cache["blocks.3.attn.hook_pattern"], expected_cache["blocks.3.attn.hook_pattern"])
    assert torch.equal(streamed(ids, return_type="loss"), plain(ids, return_type="loss"))
    assert torch.equal(streamed(ids, stop_at_layer=2), plain(ids, stop_at_layer=2))
    assert torch.equal(streamed.generate(ids[:1, :5], max_new_tokens=4), plain.generate(ids[:1, :5], max_new_tokens=4))
    assert all(p.device.type == "meta" for p in streamed.blocks.parameters())

    def fail(x, hook):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        streamed.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_mid", fail)])
    assert all(p.device.type == "meta" for p in streamed.blocks.parameters())  # the failing block was freed


def test_backward_and_start_at_layer_through_an_offloaded_model(ckpt):
    """With gradients on, streamed weights are not reused while autograd holds them: input gradients equal in memory."""
    plain, streamed = load_model(ckpt), load_model(ckpt, offload=True)
    resid = torch.randn(2, 7, plain.cfg.d_model, generator=torch.Generator().manual_seed(1))  # [batch, pos, d_model]
    grads = []
    for m in (plain, streamed):
        x = resid.clone().requires_grad_(True)
        m(x, start_at_layer=1).square().mean().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)


def test_nested_call_on_an_offloaded_model_is_refused_in_one_line(ckpt):
    streamed = load_model(ckpt, offload=True)
    ids = batches()[0][0]

    def call_again(x, hook):
        streamed(ids[:, :3])

    with pytest.raises(ValueError, match="called again while it was running"):
        streamed.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_mid", call_again)])
    assert torch.equal(streamed(ids), load_model(ckpt)(ids))  # and the model still works afterwards


def test_pickled_checkpoint_refused(tmp_path, ckpt):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((ckpt / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: offload=True \(--offload\) streams safetensors checkpoints only"):
        load_model(folder, offload=True)


def test_probe_activations_streamed_equal(ckpt):
    from residscope.probes.linear import collect_activations

    data, _ = batches()
    a = collect_activations(load_model(ckpt), data, max_tokens=70, progress=False)
    b = collect_activations(load_model(ckpt, offload=True), data, max_tokens=70, progress=False)
    assert a.layers == b.layers and (a.sample == b.sample).all()
    for layer in a.layers:
        assert (a.features[layer] == b.features[layer]).all()


def test_pruned_export_without_holding_the_model(ckpt, tmp_path):
    """The streamed export (tensors copied from disk, renumbered) equals save_pretrained of the in-memory model."""
    from safetensors.torch import load_file

    from residscope.surgery import remove_layers, save_pretrained

    def tensors(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    for offload, name in ((False, "plain"), (True, "streamed")):
        save_pretrained(remove_layers(load_model(ckpt, offload=offload), [1, 2]), tmp_path / name)
    plain, streamed = tensors(tmp_path / "plain"), tensors(tmp_path / "streamed")
    assert sorted(plain) == sorted(streamed) and "model.layers.1.mlp.up_proj.weight" in plain
    for key in plain:
        assert torch.equal(plain[key], streamed[key]), key
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()  # sharded like its source
    reloaded = load_model(tmp_path / "streamed")
    data, _ = batches()
    torch.testing.assert_close(forward_logits(reloaded, data), forward_logits(load_model(tmp_path / "plain"), data),
                               rtol=0, atol=0)


def forward_logits(model, data):
    return torch.cat([r.output for r in forward_batches(model, data, progress=False)])


def test_cli_bi_offload_equals_in_memory(ckpt, capsys):
    from residscope.apps.cli import main

    args = ["bi", "--model", str(ckpt), "--samples", "4", "--batch-size", "2", "--seq-len", "16", "--json"]
    main(args)
    plain = json.loads(capsys.readouterr().out)
    main(args + ["--offload"])
    streamed = json.loads(capsys.readouterr().out)
    torch.testing.assert_close(torch.tensor(streamed["scores"]), torch.tensor(plain["scores"]), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_streaming_peak_rss_stays_under_0_4x_checkpoint(tmp_path):
    """A ~420 MB float32 model (8 blocks of 51 MB): streaming holds about two blocks, whatever the depth."""
    bench = Path(__file__).parents[1] / "benchmarks" / "bench_offload.py"
    args = [sys.executable, str(bench), "--dir", str(tmp_path / "ckpt"), "--layers", "8", "--d-model", "1024",
            "--d-mlp", "2816", "--heads", "16", "--vocab", "1024", "--dtype", "float32", "--batches", "2",
            "--seq-len", "64"]
    out = subprocess.run(args, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert res["checkpoint_gb"] > 0.4
    assert res["read_gb"] == pytest.approx(res["checkpoint_gb"] - 8.4e-3, abs=2e-3)  # every block read once
    assert res["streaming_rss_growth_over_checkpoint"] < 0.4, res
