"""Evaluation beyond perplexity (`residscope.analyses.evaluation`, `eval_tasks`, `lm_eval_model`, `surgery.cut_lens`)
and the `evaluate` / `export` commands, on a tiny random Llama with a real BPE tokenizer.

The scorers are checked against direct computations (full forwards, `model.generate`), lm-evaluation-harness against
them on the same items, and every bad input against its one-line message."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import run_cli
from residscope.analyses import eval_tasks
from residscope.analyses.evaluation import (EvaluationReport, compare_reports, context_continuation_ids, evaluate_model,
                                            greedy_until, loglikelihoods, parse_tasks, rolling_loglikelihood)
from residscope.model import load_model
from residscope.model.errors import InputError
from tiny_llama import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", n_layers=4)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir)


# ---- items -----------------------------------------------------------------------------------------------------------

def test_items_are_seeded_and_correct():
    a = eval_tasks.addition_items(5, seed=3)
    assert a == eval_tasks.addition_items(5, seed=3) and a != eval_tasks.addition_items(5, seed=4)
    for it in a:
        lines = it["prompt"].split("\n")
        assert len(lines) == 5 and int(it["target"]) == it["a"] + it["b"]
        for line in lines[:-1]:
            x, rest = line.split(" + ")
            y, s = rest.split(" = ")
            assert int(x) + int(y) == int(s)
    for it in eval_tasks.brackets_items(20, seed=1):
        seq = it["prompt"].rsplit("\n", 1)[-1].removesuffix(" ->").split() + it["target"].split()
        stack = []
        for b in seq:  # prefix + target must be balanced, and the prefix must leave something open
            if b in "([{":
                stack.append(b)
            else:
                assert stack and "([{"[")]}".index(b)] == stack.pop()
        assert not stack and it["target"].strip()
    cloze = eval_tasks.cloze_items()
    assert len(cloze) >= 40 and all(it["target"].strip().lower() in it["context"].lower() for it in cloze)
    assert eval_tasks.cloze_items(5, seed=2) == eval_tasks.cloze_items(5, seed=2)
    assert eval_tasks.exact_match(" 940\n12 + 3", " 940") and not eval_tasks.exact_match(" 9401", " 940")
    assert eval_tasks.exact_match("] )", " ])")


# ---- scorers against direct computations ---------------------------------------------------------------------------

def test_loglikelihood_equals_a_full_forward(tiny):
    pairs = [("The grass is green. The sky is", " blue"), ("def f(x): return x", " + 1"), ("", "hello")]
    got = loglikelihoods(tiny, pairs, batch_size=2)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        c, x = context_continuation_ids(tiny, ctx, cont)
        ids = torch.tensor([c + x])
        logp = tiny(ids)[0].detach().log_softmax(-1)
        want = sum(float(logp[len(c) - 1 + i, t]) for i, t in enumerate(x))
        assert lp == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(logp[len(c) - 1 + i].argmax()) == t for i, t in enumerate(x))
    c, x = context_continuation_ids(tiny, "The sky is ", "blue")  # trailing space moves to the continuation
    assert tiny.tokenizer.decode(x) == " blue"


def test_rolling_loglikelihood_windows(tiny, monkeypatch):
    text = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    ids = tiny.to_tokens(text)
    assert ids.shape[1] > 16
    full = float(tiny(ids).detach()[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).sum())
    assert rolling_loglikelihood(tiny, text) == pytest.approx(full, abs=1e-3)
    from residscope.analyses import evaluation

    monkeypatch.setattr(evaluation, "max_length", lambda model: 8)  # windows of 8 tokens, 7 new targets each
    want, n = 0.0, ids.shape[1]
    for start in range(1, n, 7):
        end = min(start + 7, n)
        first = max(0, end - 8)
        logp = tiny(ids[:, first:end - 1])[0].log_softmax(-1)
        want += float(logp[start - first - 1:].gather(-1, ids[0, start:end, None]).sum())
    assert rolling_loglikelihood(tiny, text) == pytest.approx(want, abs=1e-3)


def test_greedy_until_equals_generate(tiny):
    prompts = ["The grass is", "12 + 34 = 46\n5 + 6 =", "a"]
    got = greedy_until(tiny, prompts, until=("\n",), max_new_tokens=6, batch_size=2)
    for p, g in zip(prompts, got):
        ids = tiny.to_tokens(p)
        out = tiny.generate(ids, max_new_tokens=6, stop_at_eos=False)
        want = tiny.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).split("\n")[0]
        assert g == want or want.startswith(g)  # an EOS stops ours earlier


def test_evaluate_model_report_and_comparison(tiny):
    from residscope.surgery import remove_layers

    report = evaluate_model(tiny, ["addition", "brackets", "cloze", "passkey"], n=3, seed=1)
    assert set(report.results) == {"addition", "brackets", "cloze", "passkey"}
    assert report.results["addition"].n == 3 and report.results["passkey"].n == 3
    again = EvaluationReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert [r.delta for r in compare_reports(again, report)] == [0.0] * 4
    pruned = evaluate_model(remove_layers(tiny, [1]), ["addition"], n=3, seed=1)
    assert pruned.layer_origin == [0, 2, 3] and [r.task for r in compare_reports(report, pruned)] == ["addition"]
    with pytest.raises(InputError, match="seed 0"):
        compare_reports(evaluate_model(tiny, ["addition"], n=3, seed=0), pruned)


def test_cut_comparison_maps_blocks_to_their_original_index(tiny):
    from residscope.surgery import remove_layers
    from residscope.surgery.cut_lens import cut_comparison, cut_table

    pruned = remove_layers(tiny, [1, 2])
    c = cut_comparison(tiny, pruned, seq_len=16, samples=2, batch_size=2)
    assert c.removed == [1, 2] and c.n_tokens == 32
    assert c.lens_agreement_pruned[1] is None and c.lens_agreement_pruned[3] == pytest.approx(1.0)  # last block = final
    assert c.lens_agreement_dense[3] == pytest.approx(1.0) and c.sink_mass_pruned[2] is None
    assert 0 <= c.final_top1_agreement <= 1 and c.ppl_pruned > 0
    same = cut_comparison(tiny, remove_layers(tiny, []), seq_len=16, samples=2, batch_size=2)
    assert same.final_top1_agreement == 1.0 and same.sink_mass_pruned == pytest.approx(same.sink_mass_dense)
    assert "block" in cut_table(c)
    with pytest.raises(InputError, match="the one it was cut from"):
        cut_comparison(pruned, pruned)


def test_parse_tasks():
    assert parse_tasks("cloze,addition,cloze") == ["cloze", "addition"]
    assert parse_tasks("all") == ["addition", "brackets", "cloze", "passkey"]
    with pytest.raises(InputError, match="--tasks: unknown task 'mmlu'"):
        parse_tasks("addition,mmlu")


# ---- lm-evaluation-harness ------------------------------------------------------------------------------------------

def test_importing_residscope_never_imports_lm_eval():
    code = ("import sys, residscope.apps.cli, residscope.analyses.evaluation, residscope.surgery.cut_lens, "
            "residscope.model.gguf_export; assert 'lm_eval' not in sys.modules, 'lm_eval imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_offline_tasks_through_lm_eval_simple_evaluate(tiny, tmp_path, monkeypatch):
    """The harness, offline, on residscope's task files: its answers and log-likelihoods are residscope's."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lm_eval.api.registry import get_model

    from residscope.evaluate import ResidscopeLM, write_lm_eval_tasks  # the documented name; registers the model type

    assert get_model("residscope") is ResidscopeLM
    files = write_lm_eval_tasks(tmp_path / "tasks", n=4, seed=0, tasks=("addition", "cloze"))
    assert set(files) == {"residscope_addition", "residscope_cloze"}
    out = lm_eval.simple_evaluate(model=ResidscopeLM(model=tiny, batch_size=4), tasks=list(files),
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
                                  log_samples=True)
    items = eval_tasks.addition_items(4, seed=0)
    mine = greedy_until(tiny, [it["prompt"] for it in items], until=("\n", tiny.tokenizer.eos_token), max_new_tokens=8)
    samples = sorted(out["samples"]["residscope_addition"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == mine
    acc = sum(eval_tasks.exact_match(a, it["target"]) for a, it in zip(mine, items)) / 4
    assert out["results"]["residscope_addition"]["exact_match,none"] == pytest.approx(acc)
    cloze = eval_tasks.cloze_items(4, seed=0)
    scored = loglikelihoods(tiny, [(it["context"], it["target"]) for it in cloze])
    samples = sorted(out["samples"]["residscope_cloze"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0][0] for s in samples] == pytest.approx([lp for lp, _ in scored], abs=1e-5)
    assert out["results"]["residscope_cloze"]["acc,none"] == pytest.approx(sum(g for _, g in scored) / 4)


# ---- the commands ---------------------------------------------------------------------------------------------------

def test_evaluate_command_json_and_baseline(tiny_dir, tmp_path, capsys):
    from residscope.surgery import remove_layers

    report = tmp_path / "dense.json"
    code, out, err = run_cli(["evaluate", "--model", tiny_dir, "--tasks", "addition,cloze", "--n", "3", "--out", report,
                          "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert json.loads(report.read_text()) == data and data["results"]["addition"]["n"] == 3
    pruned_dir = tmp_path / "pruned"
    remove_layers(load_model(tiny_dir), [2]).save_pretrained(pruned_dir)
    code, out, err = run_cli(["evaluate", "--model", pruned_dir, "--tasks", "addition,cloze", "--n", "3",
                          "--baseline", report], capsys)
    assert code == 0, err
    assert "baseline" in out and "delta" in out and "cloze" in out
    code, out, err = run_cli(["evaluate", "--model", pruned_dir, "--tasks", "cloze", "--n", "2", "--baseline", tiny_dir,
                          "--cut", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["cut"]["removed"] == [2]
    code, out, err = run_cli(["evaluate", "--model", tiny_dir, "--tasks", "addition", "--n", "2",
                          "--lm-eval", "residscope_addition", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["lm_eval"]["residscope_addition"]["exact_match,none"] == data["results"]["addition"]["accuracy"]


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "addition,bogus"], "--tasks: unknown task 'bogus'"),
    (["--n", "0"], "--n must be an integer in [1, "),
    (["--cut"], "--cut needs --baseline"),
    (["--out", "EXISTING"], "exists (pass --force"),
    (["--n", "1", "--tasks", "addition", "--lm-eval", "residscope_nope"], "--lm-eval: unknown task 'residscope_nope'"),
])
def test_evaluate_bad_inputs_are_one_line(tiny_dir, tmp_path, capsys, argv, message):
    existing = tmp_path / "r.json"
    existing.write_text("{}")
    argv = [str(existing) if a == "EXISTING" else a for a in argv]
    code, out, err = run_cli(["evaluate", "--model", tiny_dir, *argv], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert existing.read_text() == "{}"


def test_export_command(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RESIDSCOPE_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "m.gguf"
    code, out, err = run_cli(["export", "--model", tiny_dir, "--gguf", target, "--quant", "q8_0"], capsys)
    assert code == 0, err
    assert "Q8_0" in out and target.is_file()
    code, out, err = run_cli(["export", "--model", tiny_dir, "--gguf", target], capsys)
    assert code == 2 and "exists (pass --force" in err and err.count("\n") == 1
    code, out, err = run_cli(["export", "--model", tiny_dir, "--gguf", tmp_path / "n.gguf", "--quant", "q5_k"], capsys)
    assert code == 2 and err == "residscope: error: --quant must be one of f32, f16, q8_0, q4_0; got 'q5_k'\n"
    assert not (tmp_path / "n.gguf").exists()
    code, out, err = run_cli(["prune", "--model", tiny_dir, "--layers", "1", "--out", tmp_path / "pruned", "--gguf",
                          tmp_path / "p.gguf", "--quant", "q4_0", "--seq-len", "16", "--eval-samples", "2"], capsys)
    assert code == 0, err
    assert "p.gguf (q4_0" in out and load_model(tmp_path / "p.gguf").cfg.n_layers == 3
    code, out, err = run_cli(["prune", "--model", tiny_dir, "--layers", "1", "--out", tmp_path / "pruned2", "--gguf",
                          tmp_path / "p.gguf"], capsys)
    assert code == 2 and "--gguf" in err and "exists" in err and not (tmp_path / "pruned2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
