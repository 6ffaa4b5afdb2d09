"""Healing a pruned model: deterministic with a seed, lowers the training loss, LoRA merged into plain weights, the
saved folder reloads in transformers with residscope's logits; `residscope heal` and its bad input."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from conftest import run_cli
from residscope.analyses.perplexity import perplexity
from residscope.model import load_model
from residscope.surgery import heal, remove_layers, save_pretrained, streamline
from residscope.surgery.criteria import angular_distances
from test_surgery import VOCAB, make_hf, save


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save(make_hf(n_layers=4, seed=5), tmp_path_factory.mktemp("heal") / "ckpt")
    return load_model(folder), folder


def data(n, seed, b=2, p=16):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, p), generator=gen) for _ in range(n)]


TRAIN, EVAL = data(3, 0), data(1, 9)


@pytest.mark.parametrize("method", ["partial", "lora"])
def test_heal_is_deterministic_lowers_the_loss_and_reloads_in_transformers(tiny, tmp_path, method):
    model, _ = tiny
    runs = []
    for _ in range(2):
        pruned = remove_layers(model, [1])
        before = perplexity(pruned, TRAIN, progress=False).nll
        result = heal(pruned, TRAIN, EVAL, method=method, last_k=1, steps=6, grad_accum=2, lr=1e-2, seed=3,
                      progress=False)
        runs.append((pruned, result))
    (a, ra), (b, rb) = runs
    assert ra.losses == rb.losses and ra.curve == rb.curve
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    assert perplexity(a, TRAIN, progress=False).nll < before - 0.05  # it learned the training text
    assert ra.curve[0]["ppl"] == ra.before and ra.curve[-1]["ppl"] == ra.after and ra.curve[-1]["step"] == 6
    assert ra.note is None and ra.train_tokens == 6 * 2 * 2 * 15
    if method == "lora":
        assert all(type(m) is torch.nn.Linear for n, m in a.named_modules() if n.endswith("_proj"))
        assert not any("lora" in n for n, _ in a.named_parameters())
        assert all(name.endswith(("gate_proj", "up_proj", "down_proj")) for name in ra.trained)
    else:
        assert {n.split(".")[1] for n in ra.trained if n.startswith("blocks.")} == {"2"}  # the last of 3 blocks
    folder = save_pretrained(a, tmp_path / method)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = data(1, 11)[0]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, a(ids), rtol=1e-4, atol=1e-4)
    fresh = remove_layers(model, [1])
    assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in fresh.parameters()]  # restored


def test_heal_of_an_unpruned_model_is_allowed_and_says_so(tiny):
    model, _ = tiny
    result = heal(remove_layers(model, []), TRAIN, EVAL, steps=1, progress=False, nothing_removed=True)
    assert "nothing removed" in result.note


def test_streamline_replaces_the_closest_span_by_one_trained_block(tiny, tmp_path):
    """LLM-Streamline: the n + 1 blocks with the closest entering / leaving streams become their first block, trained
    to map one to the other; deterministic; the result exports and reloads in transformers."""
    model, folder = tiny
    distances, _ = angular_distances(model, TRAIN, 2, progress=False)
    runs = []
    for _ in range(2):
        m = load_model(folder)
        result = streamline(m, TRAIN, EVAL, 1, steps=8, lr=1e-4, seed=1, progress=False)
        runs.append((m, result))
    (a, ra), (b, rb) = runs
    assert ra.losses == rb.losses and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    start = int(torch.argmin(distances))
    assert ra.method == "streamline" and ra.streamline["start"] == start and ra.streamline["removed"] == [start + 1]
    assert ra.streamline["span_distance"] == pytest.approx(float(distances[start]))
    assert len(a.blocks) == 3 and a.layer_origin == [i for i in range(4) if i != start + 1]
    assert {n.split(".")[1] for n in ra.trained} == {str(start)} and ra.trainable_params == sum(
        p.numel() for p in a.blocks[start].parameters())
    assert ra.streamline["mse_after"] < 0.9 * ra.streamline["mse_before"]  # the block learns the span's map
    untouched = load_model(folder)  # every other block keeps its weights
    for i, origin in enumerate(a.layer_origin):
        if origin != start:
            for x, y in zip(a.blocks[i].parameters(), untouched.blocks[origin].parameters()):
                assert torch.equal(x, y)
    saved = save_pretrained(a, tmp_path / "streamlined")
    hf = transformers.AutoModelForCausalLM.from_pretrained(saved, torch_dtype=torch.float32).eval()
    ids = data(1, 11)[0]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, a(ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="--remove: streamline removes 1 to 3 blocks"):
        streamline(load_model(folder), TRAIN, EVAL, 4, progress=False)
    plain = streamline(load_model(folder), TRAIN, EVAL, 1, loss="mse", steps=8, lr=1e-4, seed=1, progress=False)
    span = plain.streamline
    assert span["loss"] == "mse" and span["start"] == start and span["mse_after"] < span["mse_before"]
    assert span["mse_before"] != pytest.approx(ra.streamline["mse_before"])  # a different measure of the same start


SMALL = ["--steps", "2", "--seq-len", "16", "--samples", "4", "--eval-samples", "2", "--batch-size", "2"]


def test_cli_heal_writes_a_checkpoint_and_the_curve(tiny, tmp_path, capsys):
    _, folder = tiny
    pruned = save_pretrained(remove_layers(load_model(folder), [2]), tmp_path / "pruned",
                             pruning_info={"removed_layers": [2], "metric": "bi"})
    code, out, err = run_cli(["heal", "--model", str(pruned), "--out", str(tmp_path / "healed"), *SMALL,
                               "--curve-json", str(tmp_path / "curve.json")], capsys)
    assert code == 0, err
    assert "held-out perplexity:" in out and "nothing removed" not in err
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert [p["step"] for p in curve["curve"]][0] == 0 and curve["steps"] == 2
    info = json.loads((tmp_path / "healed" / "residscope_pruning.json").read_text())
    assert info["removed_layers"] == [2] and info["healing"]["method"] == "partial"
    assert info["kept_layers"] == [0, 1, 3] and info["n_layers_before"] == 4  # the pruned folder's provenance kept
    assert transformers.AutoConfig.from_pretrained(tmp_path / "healed").num_hidden_layers == 3

    code, out, err = run_cli(["heal", "--model", str(folder), "--out", str(tmp_path / "dense"), *SMALL], capsys)
    assert code == 0 and "nothing removed" in err and "note:" in out

    code, out, err = run_cli(["heal", "--model", str(pruned), "--method", "streamline", "--remove", "1",
                              "--out", str(tmp_path / "streamlined"), *SMALL], capsys)
    assert code == 0, err
    info = json.loads((tmp_path / "streamlined" / "residscope_pruning.json").read_text())
    span = info["healing"]["streamline"]
    assert info["metric"] == "llm-streamline" and info["removed_layers"] == [2, *span["removed_original"]]
    assert 2 not in span["removed_original"] and f"removed {span['removed_original']}" in out
    assert transformers.AutoConfig.from_pretrained(tmp_path / "streamlined").num_hidden_layers == 2


@pytest.mark.parametrize("argv, message", [
    (["--method", "qlora"], "--method must be one of partial, lora or streamline"),
    (["--method", "lora", "--lora-modules", "gate_proj,mlp"], "--lora-modules: choose from"),
    (["--steps", "0"], "--steps must be "),
    (["--last-k", "9"], "--last-k must be between 0 and 4"),
    (["--out", "FULL"], "--out"),
    (["--method", "streamline"], "--remove goes with --method streamline"),
    (["--remove", "2"], "--remove goes with --method streamline"),
    (["--method", "streamline", "--remove", "4"], "--remove: streamline removes 1 to 3 blocks of this 4-layer model"),
    (["--method", "streamline", "--remove", "1", "--streamline-loss", "l1"], "--streamline-loss must be one of"),
])
def test_cli_heal_bad_input_is_one_line(tiny, tmp_path, capsys, argv, message):
    _, folder = tiny
    (tmp_path / "FULL").mkdir()
    (tmp_path / "FULL" / "x").write_text("x")
    argv = [str(tmp_path / a) if a == "FULL" else a for a in argv]
    out_dir = [] if "--out" in argv else ["--out", str(tmp_path / "OUT")]
    code, out, err = run_cli(["heal", "--model", str(folder), *out_dir, *SMALL, *argv], capsys)  # argv last: it wins
    lines = err.strip().splitlines()
    assert code == 2 and message in lines[-1] and lines[-1].startswith("residscope: error:"), err
    assert not (tmp_path / "OUT").exists()
