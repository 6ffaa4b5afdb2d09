"""Data-parallel CLI commands: `--nproc N` starts N local workers with torch's elastic launcher
(`torch.distributed.launcher.api`, what `torchrun` runs), and a command started by `torchrun` joins the process group
that torchrun describes in RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (gloo on CPU, NCCL on CUDA).

A command uses three calls:

    if workers.launched(bi, locals(), nproc=nproc, n_batches=...):   # this process only started the workers
        return
    device = workers.join(device, n_batches=...)                      # joins torchrun's group, if any
    ...                                                               # the analyses shard batches and all-reduce sums
    if not workers.is_main():                                         # rank 0 alone prints and writes files
        return

Errors reach the user as they would without workers: each worker writes its failure to a file the launching process
reads (`_relay`), so a worker's InputError is the same one line and exit code 2, a bug is one line naming the rank plus
a short traceback (exit 1), Ctrl-C is "interrupted" (exit 130). The other workers are stopped by the launcher before
rank 0 writes anything (rank 0 writes only after the last all-reduce, which needs every rank).

The environment decides whether a process is a worker: WORLD_SIZE with torchrun's TORCHELASTIC_RUN_ID (torchrun, or
our launcher), or WORLD_SIZE with RANK, MASTER_ADDR and MASTER_PORT (a manual launch, joined with a short timeout,
RESIDSCOPE_JOIN_TIMEOUT seconds, default 60). A stray WORLD_SIZE without the rest is refused in one line, never a
rendezvous traceback or a 30-minute wait.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import traceback
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Callable, get_type_hints

import typer

from residscope.runtime.distributed import is_main  # noqa: F401 - re-exported for the commands
from residscope.common.errors import InputError


ERRORS_ENV = "RESIDSCOPE_WORKER_ERRORS"  # folder where each worker writes its failure (set by `launch`)
JOIN_TIMEOUT_ENV = "RESIDSCOPE_JOIN_TIMEOUT"  # seconds a manually launched rank waits for its peers (default 60)
_MANUAL = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def env_world_size() -> int | None:
    """WORLD_SIZE when this process is a worker (started by torchrun or our launcher, or by hand with RANK,
    MASTER_ADDR and MASTER_PORT); None for a plain process. A WORLD_SIZE without the rest is refused."""
    value = os.environ.get("WORLD_SIZE")
    if value is None:
        return None
    try:
        world = int(value)
    except ValueError:
        raise InputError(f"WORLD_SIZE: expected an integer, got {value!r}") from None
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return world
    missing = [k for k in _MANUAL if not os.environ.get(k)]
    if missing:
        raise InputError(f"WORLD_SIZE={value} is set in the environment but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not: this process was not started by torchrun; "
                         "unset WORLD_SIZE (or start the command with torchrun)")
    return world


def check_workers(n: int, n_batches: int, *, arg: str) -> None:
    if n < 1:
        raise InputError(f"{arg}: must be >= 1, got {n}")
    if n > n_batches:
        raise InputError(f"{arg}: {n} workers but only {n_batches} batch{'es' if n_batches != 1 else ''} of work; "
                         "each worker needs at least one (more samples or smaller batches)")


def launched(command: Callable, params: dict, *, nproc: int, n_batches: int) -> bool:
    """With nproc > 1 in a plain process: run `command(**params)` in `nproc` local workers and return True once they
    all finished. False when this process should do the work itself (nproc == 1, or it already is a worker)."""
    world = env_world_size()
    if world is not None:
        if nproc != 1:
            raise InputError(f"--nproc: this process already runs as one of {world} workers (WORLD_SIZE is set, e.g. "
                             "by torchrun); leave --nproc out")
        return False
    check_workers(nproc, n_batches, arg="--nproc")
    if nproc == 1:
        return False
    names = inspect.signature(command).parameters  # `params` may be the caller's locals(): keep its arguments only
    args = {k: (str(params[k]) if isinstance(params[k], Path) else params[k]) for k in names} | {"nproc": 1}
    # workers are fresh interpreters running this module (a spawned function would re-run the console script)
    launch(nproc, sys.executable, "-m", __name__, command.__module__, command.__name__, json.dumps(args))
    return True


def join(device: str, *, n_batches: int) -> str:
    """Join the process group described by the environment (torchrun or `launched`) and return this rank's device:
    "cuda" becomes cuda:LOCAL_RANK. A plain process gets `device` back unchanged."""
    world = env_world_size()
    if world is None:
        return device
    import torch
    import torch.distributed as dist

    check_workers(world, n_batches, arg="WORLD_SIZE")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        device = f"cuda:{local_rank}"
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun / our launcher: its agent already gathered every rank
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=_manual_store(world), rank=int(os.environ["RANK"]),
                                    world_size=world)
    return device


def _manual_store(world: int):
    """The rendezvous store of a rank launched by hand (RANK / MASTER_ADDR / MASTER_PORT), joined within a short
    timeout: a missing peer or a stray environment then fails in one line instead of torch's 30-minute default."""
    import torch.distributed as dist

    rank, addr, port = int(os.environ["RANK"]), os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    seconds = float(os.environ.get(JOIN_TIMEOUT_ENV, "60"))
    if not 0 <= rank < world:
        raise InputError(f"RANK={rank} is not in 0..{world - 1} (WORLD_SIZE={world})")
    fail = (f"rank {rank} of WORLD_SIZE={world} could not join the others at {addr}:{port} within {seconds:g} s "
            "(RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from the environment: start every rank, or unset them)")
    if rank != 0 and not _reachable(addr, int(port), seconds):  # polled here: torch's client logs pages of C++ frames
        raise InputError(fail)
    try:
        return dist.TCPStore(addr, int(port), world, is_master=rank == 0, timeout=timedelta(seconds=seconds),
                             wait_for_workers=True)
    except (RuntimeError, ValueError, OSError):  # DistStoreError / DistNetworkError are RuntimeErrors
        raise InputError(fail) from None


def _reachable(addr: str, port: int, seconds: float) -> bool:
    """Whether something listens at addr:port within `seconds` (rank 0's store, started by then)."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((addr, port), timeout=1).close()
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, entry: Callable | str, *args) -> dict:
    """Run `entry(*args)` (a function, or a program with arguments) in `nproc` local workers started by torch's elastic launcher on loopback; returns each rank's
    return value. Rank 0 keeps the terminal; the others' stderr goes to a temporary log folder, read back when one fails.
    A failure raises typer.Exit(1) after printing `residscope: error: worker rank R failed: <its error>`."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    log_dir = Path(tempfile.mkdtemp(prefix="residscope-workers-"))
    errors = log_dir / "errors"
    errors.mkdir()
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"residscope-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", local_addr="127.0.0.1",
        max_restarts=0, start_method="spawn", monitor_interval=0.1,
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir), redirects={r: Std.NONE if r == 0 else Std.ERR for r in range(nproc)}),
    )
    # the launcher's reports (a page per failure, a line per signal) are said by us in one line: its loggers set
    # their own levels, so each is quietened, not just the parent
    elastic_logs = [logging.getLogger(name) for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]
                    if name.startswith("torch.distributed.elastic")]
    levels = [log.level for log in elastic_logs]
    for log in elastic_logs:
        log.setLevel(logging.CRITICAL)
    try:
        with _env(ERRORS_ENV, str(errors)):  # spawned workers inherit the environment
            return elastic_launch(config, entry)(*args)
    except ChildFailedError as e:
        _report_failure(e, errors, log_dir)
    except SignalException as e:  # the launcher turns SIGINT / SIGTERM into this
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        typer.echo(f"residscope: stopped by signal {signal.Signals(e.sigval).name}", err=True)
        raise typer.Exit(128 + int(e.sigval)) from None
    finally:
        for log, level in zip(elastic_logs, levels):
            log.setLevel(level)
        shutil.rmtree(log_dir, ignore_errors=True)


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _report_failure(error, errors: Path, log_dir: Path) -> None:
    """What the workers relayed, as the command would say it without workers: a user's mistake (the same on every rank
    that met it) as InputError -> one line, exit 2; a Ctrl-C as KeyboardInterrupt; else a bug: one line naming the
    rank, the end of its traceback, exit 1. Workers that died without relaying (killed) are named by their exit."""
    relayed = {}
    for path in sorted(errors.glob("rank-*.json")):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
            relayed[int(record["rank"])] = record
    for kind in ("input", "interrupted"):
        for record in relayed.values():
            if record["kind"] == kind:
                if kind == "interrupted":
                    raise KeyboardInterrupt
                raise InputError(record["text"])
    bugs = [r for r in relayed.values() if r["kind"] == "bug"]
    if bugs:
        bug = bugs[0]
        lines = bug["text"].rstrip().splitlines()
        typer.echo(f"residscope: error: worker rank {bug['rank']} failed: {lines[-1] if lines else 'unknown error'}",
                   err=True)
        typer.echo("\n".join(_short_traceback(lines)), err=True)
        raise typer.Exit(1)
    rank, failure = error.get_first_failure()
    typer.echo(f"residscope: error: worker rank {rank} failed: {_failure_line(failure, log_dir)}", err=True)
    raise typer.Exit(1)


def _short_traceback(lines: list[str], frames: int = 3) -> list[str]:
    """The last `frames` frames of a formatted traceback and its final line: where the bug is, not the launcher."""
    starts = [i for i, line in enumerate(lines) if line.startswith('  File "')]
    keep = starts[-frames:] if starts else []
    return (["Traceback (most recent call last, last frames of the worker):"] + lines[keep[0]:]) if keep else lines[-1:]


def _failure_line(failure, log_dir: Path) -> str:
    """One line for a worker that failed without relaying its error: the last line it wrote to stderr, else its
    signal or exit code. (torch's failure record holds `message` as a dict in torch 2.13, a str before.)"""
    for err in sorted(log_dir.rglob(f"{failure.local_rank}/stderr.log")):
        lines = [line for line in err.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    text = str(message or "").strip()
    if failure.exitcode < 0 and text:
        return text.splitlines()[0]
    return f"exit code {failure.exitcode}"


def _relay(kind: str, text: str) -> None:
    """Worker side: leave this rank's failure where the launching process reads it (see `_report_failure`)."""
    folder = os.environ.get(ERRORS_ENV)
    if not folder:
        return
    rank = int(os.environ.get("RANK", "0"))
    with contextlib.suppress(OSError):
        path = Path(folder) / f"rank-{rank}.json"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"rank": rank, "kind": kind, "text": text}))
        os.replace(tmp, path)


def _run_command(module: str, name: str, params_json: str) -> None:
    """Worker: one thread per worker unless OMP_NUM_THREADS says otherwise (like torchrun), then `module.name(**params)`."""
    import torch
    import torch.distributed as dist

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    command = getattr(importlib.import_module(module), name)
    params = json.loads(params_json)
    hints = get_type_hints(command)
    for key, value in params.items():  # JSON carried paths as strings
        if value is not None and Path in (hints.get(key), *getattr(hints.get(key), "__args__", ())):
            params[key] = Path(value)
    code = 0
    try:
        command(**params)
        if dist.is_initialized():
            # every rank leaves together: a rank tearing gloo down while a peer is still writing its output can abort
            # the peer at exit ("terminate called without an active exception")
            dist.barrier()
    except InputError as e:  # relayed, not printed: the launching process says it once, as without workers
        _relay("input", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        code = 2
    except KeyboardInterrupt:
        _relay("interrupted", "")
        code = 130
    except typer.Exit as e:
        code = e.exit_code
    except Exception:  # noqa: BLE001 - a bug: its traceback goes to the launching process, which shows the end of it
        _relay("bug", traceback.format_exc())
        code = 1
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    _run_command(*sys.argv[1:])
