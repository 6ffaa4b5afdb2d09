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

A worker that fails makes the launching command fail with one line naming its rank; the others are stopped by the
launcher before rank 0 writes anything (rank 0 writes only after the last all-reduce, which needs every rank).
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Callable, get_type_hints

import typer

from residscope.runtime.distributed import is_main  # noqa: F401 - re-exported for the commands
from residscope.common.errors import InputError


def env_world_size() -> int | None:
    """WORLD_SIZE set by torchrun or by our launcher, None when this is a plain process."""
    value = os.environ.get("WORLD_SIZE")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"WORLD_SIZE: expected an integer, got {value!r}") from None


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
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, entry: Callable | str, *args) -> dict:
    """Run `entry(*args)` (a function, or a program with arguments) in `nproc` local workers started by torch's elastic launcher on loopback; returns each rank's
    return value. Rank 0 keeps the terminal; the others' stderr goes to a temporary log folder, read back when one fails.
    A failure raises typer.Exit(1) after printing `residscope: error: worker rank R failed: <its error>`."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    log_dir = Path(tempfile.mkdtemp(prefix="residscope-workers-"))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"residscope-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", local_addr="127.0.0.1",
        max_restarts=0, start_method="spawn", monitor_interval=0.1,
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir), redirects={r: Std.NONE if r == 0 else Std.ERR for r in range(nproc)}),
    )
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)  # its failure report is a page of text; ours is one line
    try:
        return elastic_launch(config, entry)(*args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        typer.echo(f"residscope: error: worker rank {rank} failed: {_failure_line(failure, log_dir)}", err=True)
        raise typer.Exit(1) from None
    finally:
        elastic_log.setLevel(level)
        shutil.rmtree(log_dir, ignore_errors=True)


def _failure_line(failure, log_dir: Path) -> str:
    """One line for a failed worker: its exception (recorded by `record`), else the last line it wrote to stderr."""
    if os.path.isfile(failure.error_file) and failure.message:
        return failure.message.strip().splitlines()[0]
    for err in sorted(log_dir.rglob(f"{failure.local_rank}/stderr.log")):
        lines = [line for line in err.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()
    return failure.message if failure.exitcode < 0 else f"exit code {failure.exitcode}"


def _run_command(module: str, name: str, params_json: str) -> None:
    """Worker: one thread per worker unless OMP_NUM_THREADS says otherwise (like torchrun), then `module.name(**params)`."""
    import torch
    import torch.distributed as dist
    from torch.distributed.elastic.multiprocessing.errors import record

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    command = getattr(importlib.import_module(module), name)
    params = json.loads(params_json)
    hints = get_type_hints(command)
    for key, value in params.items():  # JSON carried paths as strings
        if value is not None and Path in (hints.get(key), *getattr(hints.get(key), "__args__", ())):
            params[key] = Path(value)
    try:
        record(command)(**params)  # `record` writes the exception to the error file the launcher reads
        if dist.is_initialized():
            # every rank leaves together: a rank tearing gloo down while a peer is still writing its output can abort
            # the peer at exit ("terminate called without an active exception")
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    _run_command(*sys.argv[1:])
