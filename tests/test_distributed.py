"""Data parallelism on torch.distributed: 2 gloo workers on loopback give one process's results (1e-9 relative);
a failing worker fails the command with its rank named and nothing written; bad --nproc is refused before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from conftest import byte_tokenizer
from residscope.apps.cli import main
from residscope.apps.workers import free_port

HERE = Path(__file__).parent
WORKER = HERE / "dist_worker.py"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("dist") / "ckpt"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def run_ranks(ckpt: Path, out: Path, world: int, *extra: str) -> list[subprocess.CompletedProcess]:
    """`world` worker processes joined by MASTER_ADDR=127.0.0.1 and a free MASTER_PORT (what torchrun exports)."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(ckpt), str(out), *extra], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


def test_two_gloo_workers_equal_one_process(ckpt, tmp_path):
    from safetensors.torch import load_file

    sys.path.insert(0, str(HERE))
    from dist_worker import results

    from residscope.model import load_model

    out = tmp_path / "two.safetensors"
    done = run_ranks(ckpt, out, 2)
    assert all(p.returncode == 0 for p in done), [p.stderr[-2000:] for p in done]
    two = load_file(str(out))
    one = results(load_model(ckpt, dtype=torch.float64))  # no process group: one process scans every batch
    assert set(two) == set(one)
    for key in one:
        torch.testing.assert_close(two[key].double(), one[key].double(), rtol=1e-9, atol=0, msg=key)
    assert int(two["bi_n_tokens"]) == 10 * 24 - 5  # every batch was counted exactly once


def test_failing_worker_names_its_rank_and_writes_nothing(ckpt, tmp_path, capfd):
    import typer

    from residscope.apps.workers import launch

    out = tmp_path / "never.safetensors"
    with pytest.raises(typer.Exit) as e:
        launch(2, sys.executable, str(WORKER), str(ckpt), str(out), "1")
    assert e.value.exit_code == 1
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("residscope: error: worker rank 1 failed:") and "injected failure on rank 1" in err, err
    assert not out.exists()


def test_nproc_larger_than_batches_is_refused_before_work(ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bi", "--model", str(ckpt), "--samples", "4", "--batch-size", "2", "--nproc", "3"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("residscope: error: --nproc: 3 workers but only 2 batches of work; each worker "
                                       "needs at least one (more samples or smaller batches)\n")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["bi", "ppl"])
def test_cli_nproc_2_equals_nproc_1(ckpt, command, capfd):
    import json

    args = [command, "--model", str(ckpt), "--samples", "6", "--batch-size", "2", "--seq-len", "16", "--json",
            "--dtype", "float64"]
    main(args)
    one = json.loads(capfd.readouterr().out)
    main(args + ["--nproc", "2"])
    two = json.loads(capfd.readouterr().out)
    key = "scores" if command == "bi" else "nll"
    torch.testing.assert_close(torch.tensor(two[key]), torch.tensor(one[key]), rtol=1e-9, atol=0)
    assert two["n_tokens"] == one["n_tokens"]
