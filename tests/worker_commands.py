"""Commands the --nproc relay tests run inside real workers (`residscope.apps.workers._run_command` imports them by
module name, so tests/ is put on the workers' PYTHONPATH)."""

import os

from residscope.common.errors import InputError


def input_error_on(rank: int) -> None:
    if int(os.environ["RANK"]) == rank:
        raise InputError(f"--text: missing.txt: no such text file (rank {rank})")


def bug_on(rank: int) -> None:
    if int(os.environ["RANK"]) == rank:
        {}.strip()  # AttributeError: 'dict' object has no attribute 'strip'
