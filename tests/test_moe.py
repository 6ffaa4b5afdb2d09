"""Mixture of experts beyond the generic family tests: fused expert checkpoints, router hooks (and forcing experts
through them), per-expert outputs, dynamic skipping, routing statistics, expert attribution, expert pruning and its
export, and the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from conftest import run_cli
from family_zoo import CASES, VOCAB
from residscope.analyses.experts import expert_attribution, routing_statistics
from residscope.model import CheckpointError, InputError, load_model
from residscope.model.moe import set_skip_ratio
from residscope.surgery.experts import choose_experts, expert_pruning_record, prune_experts, subset_output


def ids(batch=2, seq=12, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    hf = CASES["qwen2_moe"]()
    folder = tmp_path_factory.mktemp("qwen2_moe") / "ckpt"
    hf.save_pretrained(folder)
    return hf, load_model(folder), folder


def test_tl_config_and_weights(qwen):
    _, m, _ = qwen
    assert m.cfg.num_experts == 6 and m.cfg.experts_per_token == 2
    assert m.cfg.sparse_layers == (0, 2, 3)
    moe = m.blocks[0].mlp
    assert moe.W_gate.shape == (64, 6)  # TransformerLens' MoE router [d_model, n_experts]
    assert moe.experts[3].W_in.shape == (64, 32) and moe.experts[3].W_out.shape == (32, 64)
    assert m.blocks[1].mlp.W_in.shape == (64, 96)  # the dense layer keeps intermediate_size


def test_fused_expert_checkpoint_loads_the_same(qwen, tmp_path):
    """transformers 5's in-memory layout: gate_up_proj [E, 2I, H] (rows [gate; up]) and down_proj [E, H, I]."""
    _, m, folder = qwen
    state = load_file(folder / "model.safetensors")
    for layer in m.cfg.sparse_layers:
        pre = f"model.layers.{layer}.mlp.experts."
        gate = [state.pop(f"{pre}{e}.gate_proj.weight") for e in range(6)]
        up = [state.pop(f"{pre}{e}.up_proj.weight") for e in range(6)]
        down = [state.pop(f"{pre}{e}.down_proj.weight") for e in range(6)]
        state[f"{pre}gate_up_proj"] = torch.stack([torch.cat((g, u)) for g, u in zip(gate, up)])
        state[f"{pre}down_proj"] = torch.stack(down)
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, str(fused / "model.safetensors"))
    tokens = ids()
    assert torch.equal(load_model(fused)(tokens), m(tokens))


def test_incomplete_expert_tensors_are_refused(qwen, tmp_path):
    _, _, folder = qwen
    state = load_file(folder / "model.safetensors")
    del state["model.layers.2.mlp.experts.4.up_proj.weight"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.mlp\.experts\.4\.up_proj\.weight' \(residscope's blocks\.2\.mlp\.experts\.4\.up_proj\.weight\)"):
        load_model(broken)
    stacked = {k: v for k, v in load_file(folder / "model.safetensors").items() if ".mlp.experts." not in k or
               not k.startswith("model.layers.0.")}
    stacked["model.layers.0.mlp.experts.gate_up_proj"] = torch.zeros(5, 64, 64)  # 5 experts for 6
    (broken / "model.safetensors").unlink()
    save_file(stacked, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"gate_up_proj.*does not split"):
        load_model(broken)


def test_router_hooks_shapes_and_forced_experts(qwen):
    hf, m, _ = qwen
    tokens = ids()
    logits, cache = m.run_with_cache(tokens)
    assert cache["blocks.0.mlp.hook_router_logits"].shape == (2, 12, 6)
    idx, w = cache["blocks.0.mlp.hook_expert_indices"], cache["blocks.0.mlp.hook_expert_weights"]
    assert idx.shape == (2, 12, 2) and w.shape == (2, 12, 2)
    assert cache["blocks.0.mlp.hook_shared_gate"].shape == (2, 12, 1)
    probs = cache["blocks.0.mlp.hook_router_logits"].softmax(-1)
    assert_close(w, probs.gather(-1, idx))  # not renormalised in this case
    assert "blocks.1.mlp.hook_router_logits" not in m.hook_dict  # the dense layer

    def force(x, hook):
        x[...] = torch.tensor([5, 4])
        return x

    seen = {}
    forced = m.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp.hook_expert_indices", force),
                                                 ("blocks.0.mlp.hook_expert_weights",
                                                  lambda x, hook: seen.setdefault("w", x.clone()))])
    assert_close(seen["w"], probs[..., [5, 4]])  # the router's own weights for the forced experts
    # the same forcing by hand: expert outputs of 5 and 4 only
    moe = m.blocks[0].mlp
    x = cache["blocks.0.ln2.hook_normalized"]
    manual = (seen["w"][..., :1] * moe.experts[5](x) + seen["w"][..., 1:] * moe.experts[4](x)
              + cache["blocks.0.mlp.hook_shared_gate"] * moe.shared_expert(x))
    out = {}
    m.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp.hook_expert_indices", force),
                                        ("blocks.0.hook_mlp_out", lambda x, hook: out.setdefault("o", x.clone()))])
    assert_close(out["o"], manual, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(forced, logits, atol=1e-4)
    with pytest.raises(InputError, match="hook_expert_indices"):
        m.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp.hook_expert_indices", lambda x, hook: x + 6)])


def test_expert_outputs_sum_to_the_mlp_output(qwen):
    _, m, _ = qwen
    tokens = ids()
    plain = m(tokens)
    m.set_use_expert_outputs(True)
    try:
        logits, cache = m.run_with_cache(tokens)
        assert_close(logits, plain, atol=1e-5, rtol=1e-5)
        parts = sum(cache[f"blocks.3.mlp.experts.{e}.hook_out"] for e in range(6)) + cache["blocks.3.mlp.hook_shared_out"]
        assert_close(parts, cache["blocks.3.hook_mlp_out"], atol=1e-6, rtol=1e-5)
        idx = cache["blocks.3.mlp.hook_expert_indices"]
        e = int(idx.reshape(-1).bincount().argmax())  # the busiest expert
        chosen = (idx == e).any(-1)  # [batch, pos]
        assert (cache[f"blocks.3.mlp.experts.{e}.hook_out"][~chosen] == 0).all()
        # ablating one expert through its hook changes the logits
        zeroed = m.run_with_hooks(tokens, fwd_hooks=[(f"blocks.3.mlp.experts.{e}.hook_out", lambda x, hook: x * 0)])
        assert chosen.any() and not torch.allclose(zeroed, plain, atol=1e-5)
    finally:
        m.set_use_expert_outputs(False)


def test_dynamic_skipping_switch(qwen):
    _, m, _ = qwen
    tokens = ids()
    plain = m(tokens)
    try:
        set_skip_ratio(m, 0.0)  # drops nothing
        assert_close(m(tokens), plain, atol=0, rtol=0)
        set_skip_ratio(m, 1.0)  # only each token's top expert (ties aside)
        top1 = m(tokens)
        assert not torch.allclose(top1, plain, atol=1e-4)
    finally:
        set_skip_ratio(m, None)
    assert_close(m(tokens), plain, atol=0, rtol=0)
    with pytest.raises(InputError, match="skip ratio"):
        set_skip_ratio(m, 1.5)


def test_routing_statistics_invariants(qwen):
    _, m, _ = qwen
    batches = [ids(seed=s) for s in range(3)]
    st = routing_statistics(m, batches, progress=False)
    assert st.layers == [0, 2, 3] and st.n_tokens == 72
    assert_close(st.load.sum(-1), torch.ones(3, dtype=torch.float64))
    assert_close(st.prob_mass.sum(-1), torch.ones(3, dtype=torch.float64))
    assert (st.entropy <= torch.log(torch.tensor(6.0, dtype=torch.float64)) + 1e-9).all()
    assert (st.imbalance >= 0.99).all() and (st.imbalance <= 6).all()
    assert ((st.topk_mass > 2 / 6) & (st.topk_mass <= 1)).all()
    assert_close(st.shared_gate_hist.sum(-1), torch.ones(3, dtype=torch.float64))
    assert (st.reap[st.load == 0] == 0).all() and (st.reap[st.load > 0] > 0).all()
    assert st.position_load.shape[0] == 3 and st.agreement_nmi.shape == (2,)
    # top tokens of an expert are tokens routed to it: recount by hand from a cache
    counts = torch.zeros(6, VOCAB)
    for b in batches:
        _, cache = m.run_with_cache(b, names_filter="blocks.2.mlp.hook_expert_indices")
        idx = cache["blocks.2.mlp.hook_expert_indices"]
        for slot in range(2):
            counts.index_put_((idx[..., slot].reshape(-1), b.reshape(-1)), torch.ones(b.numel()), accumulate=True)
    e = int(st.load[1].argmax())
    tok, share = st.top_tokens[1][e][0]
    assert counts[e, tok] == counts[e].max() and share == pytest.approx(float(counts[e, tok] / counts[e].sum()))
    padded = routing_statistics(m, [(batches[0], torch.ones_like(batches[0]).index_fill_(1, torch.tensor([11]), 0))],
                                progress=False)
    assert padded.n_tokens == 22


def test_expert_attribution_is_exact(qwen):
    _, m, _ = qwen
    a = expert_attribution(m, [ids(seed=s) for s in range(2)], progress=False)
    assert_close(a.per_expert.sum(-1) + a.shared, a.mlp_total, atol=1e-6, rtol=1e-5)
    assert a.n_tokens == 2 * 2 * 11


@pytest.mark.parametrize("criterion", ["frequency", "weight", "reap", "reconstruction"])
def test_expert_pruning_exports_what_transformers_reloads(qwen, tmp_path, criterion):
    from transformers import AutoModelForCausalLM

    _, m, _ = qwen
    batches = [ids(seed=s) for s in range(2)]
    choice = choose_experts(m, batches, 4, criterion, progress=False)
    assert all(len(v) == 4 for v in choice.keep.values())
    pruned = prune_experts(m, choice.keep)
    assert pruned.cfg.num_experts == 4 and m.cfg.num_experts == 6  # a copy
    assert pruned.blocks[0].mlp.router.weight.shape == (4, 64)
    folder = pruned.save_pretrained(tmp_path / "out", pruning_info=expert_pruning_record(choice, pruned))
    assert json.loads((folder / "config.json").read_text())["num_experts"] == 4
    record = json.loads((folder / "residscope_pruning.json").read_text())["expert_pruning"]
    assert record["criterion"] == criterion and record["kept_experts_original"]["0"] == choice.keep[0]
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = ids(seed=5)
    with torch.no_grad():
        assert_close(hf(tokens).logits, pruned(tokens), atol=1e-4, rtol=1e-4)
    assert_close(load_model(folder)(tokens), pruned(tokens), atol=0, rtol=0)


def test_reconstruction_picks_the_best_subset(qwen):
    """Lu et al.'s choice is the subset with the least reconstruction error, checked against every other subset."""
    _, m, _ = qwen
    batches = [ids(seed=s) for s in range(2)]
    choice = choose_experts(m, batches, 5, "reconstruction", progress=False)
    moe = m.blocks[2].mlp
    _, cache = m.run_with_cache(torch.cat(batches), names_filter="blocks.2.ln2.hook_normalized")
    x = cache["blocks.2.ln2.hook_normalized"].reshape(-1, 64)
    with torch.no_grad():
        outs = torch.stack([moe.experts[e](x) for e in range(6)])
        logits = moe.router(x)
        full = subset_output(moe, outs, logits, list(range(6)))
        losses = {drop: float((subset_output(moe, outs, logits, [e for e in range(6) if e != drop]) - full)
                              .double().pow(2).sum(-1).mean()) for drop in range(6)}
    best_drop = min(losses, key=losses.get)
    assert choice.keep[2] == [e for e in range(6) if e != best_drop]


def test_bad_pruning_requests_are_one_line(qwen, tmp_path):
    _, m, _ = qwen
    batches = [ids()]
    with pytest.raises(InputError, match=r"--keep must be between experts_per_token \(2\) and num_experts \(6\), got 7"):
        choose_experts(m, batches, 7, "frequency")
    with pytest.raises(InputError, match="--keep must be between"):
        choose_experts(m, batches, 1, "frequency")
    with pytest.raises(InputError, match="--criterion"):
        choose_experts(m, batches, 4, "random")
    dense = CASES["llama"]()
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(InputError, match="dense .*no experts to prune"):
        choose_experts(load_model(tmp_path / "dense"), batches, 2, "frequency")


# ---- CLI and explorer on a tiny MoE checkpoint with a real tokenizer ------------------------------------------------
@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    """A random Qwen2-MoE with the tiny BPE tokenizer of tests/tiny_llama.py (the CLI and explorer read text)."""
    from transformers import AutoTokenizer, Qwen2MoeConfig, Qwen2MoeForCausalLM

    from family_zoo import randomize
    from tiny_llama import make_tiny_checkpoint

    base = make_tiny_checkpoint(tmp_path_factory.mktemp("tok") / "tiny", n_layers=1)
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    hf = randomize(Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=6,
        num_experts_per_tok=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)))
    folder = tmp_path_factory.mktemp("moe_cli") / "moe"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


FAST = ["--seq-len", "32", "--samples", "4", "--batch-size", "2"]


def test_cli_experts_and_prune_experts(moe_folder, tmp_path, capsys):
    code, out, err = run_cli(["experts", "--model", moe_folder, *FAST, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["routing"]["layers"] == [0, 1] and report["routing"]["n_tokens"] == 4 * 32
    assert len(report["attribution"]["per_expert"]) == 2
    code, out, err = run_cli(["experts", "--model", moe_folder, *FAST, "--no-attribution"], capsys)
    assert code == 0 and "imbalance" in out and "top tokens" in out
    code, out, err = run_cli(["prune-experts", "--model", moe_folder, "--keep", "3", "--criterion", "frequency",
                          "--out", tmp_path / "p", *FAST, "--eval-samples", "2", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["expert_pruning"]["n_experts_after"] == 3 and report["perplexity"]["after"] > 1
    assert load_model(tmp_path / "p").cfg.num_experts == 3


@pytest.mark.parametrize("argv, culprit", [
    (["--keep", "7"], "--keep"),
    (["--keep", "1"], "--keep"),
    (["--keep", "3", "--criterion", "size"], "--criterion"),
])
def test_cli_prune_experts_bad_input_is_one_line(moe_folder, tmp_path, capsys, argv, culprit):
    out_dir = tmp_path / "never"
    code, out, err = run_cli(["prune-experts", "--model", moe_folder, "--out", out_dir, *FAST, *argv], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and culprit in err, err
    assert not out_dir.exists()


def test_cli_prune_experts_refuses_a_dense_model(tmp_path, capsys):
    from tiny_llama import make_tiny_checkpoint

    dense = make_tiny_checkpoint(tmp_path / "dense", n_layers=1)
    capsys.readouterr()  # the checkpoint writer's progress bar
    code, out, err = run_cli(["prune-experts", "--model", dense, "--keep", "2", "--out", tmp_path / "o", *FAST], capsys)
    assert code == 2 and "no experts to prune" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_explorer_experts_page(moe_folder, tmp_path):
    import os

    from streamlit.testing.v1 import AppTest

    app = Path(__file__).resolve().parents[1] / "apps" / "explorer_app.py"
    before = os.environ.get("RESIDSCOPE_EXPLORER_MODEL")
    os.environ["RESIDSCOPE_EXPLORER_MODEL"] = str(moe_folder)
    try:
        at = AppTest.from_file(str(app), default_timeout=180)
        at.query_params["page"] = "experts"
        at.run()
        assert not at.exception and not at.error, [e.value for e in at.exception]
        assert at.header[0].value.startswith("Mixture of experts")
        assert len(at.get("plotly_chart")) == 4
        at.number_input(key="moe_samples").set_value(2).run()
        at.button(key="moe_prune").click().run()
        assert not at.exception and not at.error
        labels = {m.label for m in at.metric}
        assert any(label.startswith("Held-out perplexity") for label in labels)
    finally:
        if before is None:
            os.environ.pop("RESIDSCOPE_EXPLORER_MODEL", None)
        else:
            os.environ["RESIDSCOPE_EXPLORER_MODEL"] = before


def test_analyses_stream_through_an_offloaded_model(qwen):
    """Layer-major streaming (load_model(offload=True)) gives the in-memory figures."""
    _, m, folder = qwen
    batches = [ids(seed=s) for s in range(2)]
    off = load_model(folder, offload=True)
    a, b = routing_statistics(m, batches, progress=False), routing_statistics(off, batches, progress=False)
    assert_close(a.load, b.load) and assert_close(a.reap, b.reap)
    assert_close(a.agreement_nmi, b.agreement_nmi)
    assert_close(expert_attribution(m, batches, progress=False).per_expert,
                 expert_attribution(off, batches, progress=False).per_expert)
