"""--nproc error paths (issue 24, class 6): a worker's mistake reaches the user as the same one line and exit code as
without workers; a bug as one line naming the rank and a short traceback; a stray WORLD_SIZE / RANK / MASTER_ADDR is
refused in one line, quickly. Two real gloo workers on loopback, started by `workers.launch` like `--nproc 2`."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import typer

from residscope.apps import workers
from residscope.common.errors import InputError

HERE = Path(__file__).parent


@pytest.fixture
def worker_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def run(name: str, rank: int):
    return workers.launch(2, sys.executable, "-m", "residscope.apps.workers", "worker_commands", name,
                          json.dumps({"rank": rank}))


def test_a_workers_input_error_is_the_same_one_line(worker_path, capfd):
    with pytest.raises(InputError, match=r"^--text: missing.txt: no such text file \(rank 1\)$"):
        run("input_error_on", 1)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "strip" not in err, err


def test_a_workers_bug_is_one_line_and_a_short_traceback(worker_path, capfd):
    with pytest.raises(typer.Exit) as e:
        run("bug_on", 0)
    assert e.value.exit_code == 1
    lines = capfd.readouterr().err.strip().splitlines()
    assert lines[0] == "residscope: error: worker rank 0 failed: AttributeError: 'dict' object has no attribute 'strip'"
    assert len(lines) < 15 and "worker_commands.py" in "\n".join(lines), lines


@pytest.mark.parametrize("env, culprit", [
    ({"WORLD_SIZE": "2"}, "RANK, MASTER_ADDR, MASTER_PORT are not"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE: expected an integer"),
])
def test_a_stray_world_size_is_refused_in_one_line(monkeypatch, env, culprit):
    for key in ("TORCHELASTIC_RUN_ID", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(InputError, match=culprit) as e:
        workers.join("cpu", n_batches=4)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_without_peers_gives_up_quickly(monkeypatch, rank):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for key, value in {"WORLD_SIZE": "2", "RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(workers.free_port()), workers.JOIN_TIMEOUT_ENV: "1"}.items():
        monkeypatch.setenv(key, value)
    t0 = time.monotonic()
    with pytest.raises(InputError, match=f"rank {rank} of WORLD_SIZE=2 could not join the others"):
        workers.join("cpu", n_batches=4)
    assert time.monotonic() - t0 < 30  # torch's default would be 30 minutes
