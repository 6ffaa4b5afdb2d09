"""Positional vectors, attention statistics and positional interventions (analyses/positional.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from conftest import save_hf
from conftest import byte_tokenizer
from residscope.analyses.positional import (
    attention_statistics,
    count_distinct_vectors,
    decompose_positions,
    describe_positions,
    interpolate_positions,
    pv_replacement_hooks,
    removal_hooks,
    removal_study,
    resid_hook_names,
)
from residscope.model import load_model

SEQ = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2)
    folder = save_hf(transformers.LlamaForCausalLM(cfg), tmp_path_factory.mktemp("tiny"))
    return load_model(folder, dtype="float64", load_tokenizer=False)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 96, (10, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def dec(tiny, ids):
    return decompose_positions(tiny, ids.split(3), progress=False)


def resid_stack(model, ids, hooks=()):
    names = resid_hook_names(model.cfg.n_layers)
    with model.hooks(fwd_hooks=list(hooks)):
        _, cache = model.run_with_cache(ids, names_filter=names)
    return torch.stack([cache[n] for n in names])  # [layer, batch, pos, d_model]


def test_streaming_mean_equals_batch_mean(tiny, ids, dec):
    h = resid_stack(tiny, ids).double()
    assert dec.vectors.shape == (tiny.cfg.n_layers + 1, SEQ, tiny.cfg.d_model)
    assert dec.n_samples == 10
    torch.testing.assert_close(dec.vectors, h.mean(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(dec.second_moment, h.pow(2).sum(-1).mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dec.mean_token_norm, h.norm(dim=-1).mean(1), rtol=1e-12, atol=1e-12)
    # variance shares by their definitions, computed from the full tensor
    share = h.mean(1).pow(2).sum((-1, -2)) / h.pow(2).sum(-1).mean(1).sum(-1)
    m = h.mean((1, 2), keepdim=True)
    r2 = (h.mean(1, keepdim=True) - m).pow(2).sum((-1, -2, -3)) / (h - m).pow(2).sum(-1).mean(1).sum(-1)
    torch.testing.assert_close(dec.positional_share, share)
    torch.testing.assert_close(dec.positional_r2, r2)
    assert bool((dec.positional_r2 > 0).all() and (dec.positional_r2 < 1).all())


def test_mixed_lengths_are_an_error(tiny, ids):
    with pytest.raises(ValueError, match="same sequence length"):
        decompose_positions(tiny, [ids[:2], ids[:2, :6]], progress=False)


def test_description_shapes_and_rules(dec):
    d = describe_positions(dec, n_components=2, cos_threshold=0.9, first_k=3)
    n = dec.n_resid_layers
    assert d.similarity.shape == (n, SEQ, SEQ) and np.allclose(np.diagonal(d.similarity, axis1=1, axis2=2), 1)
    assert d.pca_coords.shape == (n, SEQ, 2) and d.pca_explained.shape == (n, 2)
    assert d.first_token_ratio.shape == (n, 3)
    assert ((1 <= d.n_distinct) & (d.n_distinct <= SEQ)).all()
    # the clustering rule: inside a cluster every pair has cosine >= threshold
    for layer in range(n):
        for c in np.unique(d.cluster_labels[layer]):
            members = np.flatnonzero(d.cluster_labels[layer] == c)
            assert d.similarity[layer][np.ix_(members, members)].min() >= 0.9 - 1e-9


def test_count_distinct_vectors_on_known_geometry():
    base = torch.eye(3, 8, dtype=torch.float64)  # three orthogonal directions
    noise = 0.01 * torch.randn(9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    vectors = base.repeat_interleave(3, 0) + noise  # positions 0-2, 3-5, 6-8 share a direction
    n, labels = count_distinct_vectors(vectors, cos_threshold=0.95)
    assert n == 3 and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert count_distinct_vectors(vectors, cos_threshold=0.99999)[0] == 9


def test_removal_zeroes_the_positional_part(tiny, ids, dec):
    for layer in (0, 2, 4):
        h = resid_stack(tiny, ids, removal_hooks(dec, [layer]))
        assert h[layer].mean(0).abs().max() < 1e-10  # mean over samples of the hooked residual
        # the layers below are untouched
        torch.testing.assert_close(h[:layer], resid_stack(tiny, ids)[:layer])


def test_removal_of_first_k_only(tiny, ids, dec):
    h0 = resid_stack(tiny, ids)
    h = resid_stack(tiny, ids, removal_hooks(dec, [1], first_k=3))
    assert h[1, :, :3].mean(0).abs().max() < 1e-10
    torch.testing.assert_close(h[1, :, 3:], h0[1, :, 3:])
    # first_k works for sequences longer than the decomposition; all-position removal refuses them
    longer = torch.randint(0, 96, (2, 2 * SEQ), generator=torch.Generator().manual_seed(1))
    tiny.run_with_hooks(longer, fwd_hooks=removal_hooks(dec, [1], first_k=3))
    with pytest.raises(ValueError, match="longer than the decomposition"):
        tiny.run_with_hooks(longer, fwd_hooks=removal_hooks(dec, [1]))


def test_replacement_identity_and_formula(tiny, ids, dec):
    logits = tiny(ids)
    longer = torch.randint(0, 96, (2, 3 * SEQ), generator=torch.Generator().manual_seed(2))
    for x in (ids, longer):  # r=1, alpha=1 is the identity, also past the decomposition length
        torch.testing.assert_close(tiny.run_with_hooks(x, fwd_hooks=pv_replacement_hooks(dec, 2, 1.0, 1.0)), tiny(x),
                                   rtol=0, atol=0)
    assert logits.shape[1] == SEQ
    # r=2, alpha=1.5 at layer 2 on a sequence 2x longer: h - p_orig[t] + 1.5 * p[4 + (t - 4) / 2], first 4 kept
    ratio, alpha, keep = 2.0, 1.5, 4
    x = longer[:, : 2 * SEQ]
    h0 = resid_stack(tiny, x)[2]
    h = resid_stack(tiny, x, pv_replacement_hooks(dec, 2, ratio, alpha, keep))[2]
    p = dec.vectors[2]
    t = torch.arange(2 * SEQ, dtype=torch.float64)
    u = (keep + (t - keep) / ratio).clamp(max=SEQ - 1)
    lo = u.floor().long()
    w = (u - lo)[:, None]
    expected_new = p[lo] * (1 - w) + p[(lo + 1).clamp(max=SEQ - 1)] * w
    expected = h0 - p[torch.arange(2 * SEQ).clamp(max=SEQ - 1)] + alpha * expected_new
    expected[:, :keep] = h0[:, :keep]
    torch.testing.assert_close(h, expected)


def test_replacement_subtracts_a_longer_original(tiny, dec):
    long_ids = torch.randint(0, 96, (6, 2 * SEQ), generator=torch.Generator().manual_seed(3))
    long_dec = decompose_positions(tiny, long_ids.split(3), progress=False)
    hooks = pv_replacement_hooks(dec, 1, 2.0, 1.0, original=long_dec)
    h = resid_stack(tiny, long_ids, hooks)[1]
    # the positional part left at that layer is exactly the interpolated vectors (first 4 unchanged)
    target = interpolate_positions(dec.vectors[1], 2 * SEQ, 2.0)
    torch.testing.assert_close(h.mean(0)[4:], target[4:], rtol=0, atol=1e-10)
    torch.testing.assert_close(h.mean(0)[:4], long_dec.vectors[1, :4], rtol=0, atol=1e-10)


def test_interpolate_positions():
    v = torch.arange(10, dtype=torch.float64)[:, None].repeat(1, 3)
    torch.testing.assert_close(interpolate_positions(v, 10, 1.0), v, rtol=0, atol=0)
    out = interpolate_positions(v, 16, 2.0, keep_first=4)[:, 0]
    assert out[:4].tolist() == [0, 1, 2, 3] and out[4:8].tolist() == [4, 4.5, 5, 5.5] and out[-1] == 9
    with pytest.raises(ValueError, match="ratio"):
        interpolate_positions(v, 4, 0.0)


def test_attention_statistics_match_the_cached_patterns(tiny, ids):
    k = 3
    stats = attention_statistics(tiny, ids.split(4), first_k=k, progress=False)
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(tiny.cfg.n_layers)]
    _, cache = tiny.run_with_cache(ids, names_filter=names)
    pat = torch.stack([cache[n] for n in names]).double()  # [layer, batch, head, q, k]
    sink = pat[:, :, :, k:, :k].sum(-1).mean((1, 3))
    np.testing.assert_allclose(stats.sink_mass, sink.numpy(), rtol=1e-10)
    for d in (0, 1, 5, SEQ - 1):
        diag = torch.diagonal(pat, offset=-d, dim1=-2, dim2=-1).mean((1, 3))  # [layer, head]
        np.testing.assert_allclose(stats.by_distance[..., d], diag.numpy(), rtol=1e-10)
    assert stats.decay_ratio().shape == (tiny.cfg.n_layers, tiny.cfg.n_heads)


def test_removal_study_rows(tiny, ids, dec):
    rows = removal_study(tiny, dec, list(ids.split(5)), [([1, 2], None), ([1], 2)], progress=False)
    assert [r.label for r in rows] == ["original", "remove at 1,2 (all positions)", "remove at 1 (first 2)"]
    assert all(np.isfinite(r.ppl) and r.sink_mass.shape == (tiny.cfg.n_layers,) for r in rows)
    assert rows[1].ppl != rows[0].ppl
    # layer 1 = output of block 0: removing there cannot change block 0's attention
    assert rows[1].sink_mass[0] == pytest.approx(rows[0].sink_mass[0], rel=1e-12)


def test_decomposition_round_trips_through_safetensors(dec, tmp_path):
    from residscope.analyses.positional import PositionalDecomposition

    path = dec.save(tmp_path / "pv.safetensors")
    back = PositionalDecomposition.load(path)
    torch.testing.assert_close(back.vectors, dec.vectors, rtol=0, atol=0)
    assert back.n_samples == dec.n_samples and back.hook_names == dec.hook_names
    assert not list(tmp_path.glob(".*tmp"))
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="bad.safetensors"):
        PositionalDecomposition.load(tmp_path / "bad.safetensors")




def test_cli_writes_summary_vectors_and_figures(tmp_path, capsys):
    import json

    import typer

    from residscope.analyses.positional import PositionalDecomposition
    from residscope.apps import cli_positional
    from residscope.apps.errors import run_cli

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    folder = save_hf(transformers.LlamaForCausalLM(cfg), tmp_path)
    byte_tokenizer().save_pretrained(folder)
    app = typer.Typer()
    cli_positional.register(app)
    app.command("noop")(lambda: None)  # two commands, so typer keeps the subcommand name
    out = tmp_path / "out"
    args = ["positional", "--model", str(folder), "--samples", "8", "--seq-len", "16", "--out", str(out), "--batch-size",
            "4", "--remove-layers", "1", "--eval-samples", "4", "--probe-tokens", "128", "--json"]
    run_cli(app, args)
    summary = json.loads(capsys.readouterr().out)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["n_samples"] == 8 and summary["seq_len"] == 16
    assert len(summary["positional"]["n_distinct"]) == 3 and len(summary["attention"]["sink_mass_by_block"]) == 2
    assert [r["label"] for r in summary["removal"]] == ["original", "remove at 1 (all positions)", "remove at 1 (first 4)"]
    assert [p["metric"] for p in summary["probes"]] == ["r2", "auc"]
    for name in summary["files"]:
        assert (out / name).is_file(), name
    assert PositionalDecomposition.load(out / "positional_vectors.safetensors").vectors.shape == (3, 16, 32)
    assert not list(out.glob(".*"))  # no temporary files left behind

    with pytest.raises(SystemExit) as e:
        run_cli(app, [*args[:-1], "--remove-layers", "7", "--force"])  # --force: out/ is not empty any more
    assert e.value.code == 2 and "--remove-layers: layer 7 out of range" in capsys.readouterr().err


def test_variance_shares_skip_the_first_tokens(tiny, ids, dec):
    h = resid_stack(tiny, ids).double()[:, :, 3:]  # positions 3.. only
    m = h.mean((1, 2), keepdim=True)
    r2 = (h.mean(1, keepdim=True) - m).pow(2).sum((-1, -2, -3)) / (h - m).pow(2).sum(-1).mean(1).sum(-1)
    torch.testing.assert_close(dec.variance_shares(3)[1], r2)
    with pytest.raises(ValueError, match="skip_first"):
        dec.variance_shares(SEQ)


@pytest.mark.real
def test_real_model_massive_first_token_and_sinks(real_model):
    """SmolLM2-135M: the first token's residual norm dwarfs the median token's in the middle layers, attention piles
    onto the first tokens there, and removing the first tokens' positional vectors costs perplexity."""
    from residscope.analyses.corpus import calibration_batches

    m = real_model
    batches, _ = calibration_batches(m, seq_len=64, samples=8, batch_size=8)
    dec = decompose_positions(m, batches, progress=False)
    desc = describe_positions(dec)
    middle = slice(m.cfg.n_layers // 3, 2 * m.cfg.n_layers // 3 + 1)
    assert np.median(desc.first_token_ratio[middle, 0]) > 20
    stats = attention_statistics(m, batches, progress=False)
    # uniform causal attention would put k / (q + 1) on the first k keys
    q = np.arange(4, dec.seq_len)
    uniform = np.mean(4 / (q + 1))
    late = stats.sink_mass[m.cfg.n_layers // 2:].mean()
    assert late > 0.3 and late > 3 * uniform
    from residscope.analyses.perplexity import perplexity

    base = perplexity(m, batches, progress=False).ppl
    with m.hooks(fwd_hooks=removal_hooks(dec, [m.cfg.n_layers // 2], first_k=4)):
        removed = perplexity(m, batches, progress=False).ppl
    assert removed > 1.5 * base
