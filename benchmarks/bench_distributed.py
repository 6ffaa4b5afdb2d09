"""Data-parallel throughput: `residscope bi` with 1 worker against `--nproc 2`, one thread per worker.

    python benchmarks/bench_distributed.py [--model smollm2-135m] [--samples 16] [--seq-len 256] [--repeats 2]

Runs each setting `--repeats` times as a fresh command (model loading and worker start-up included, as a user sees it)
and prints one JSON line: best wall time per setting, calibration tokens per second, and the largest relative
difference between the two runs' scores (the equality the tests pin at 1e-9).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run(args: list[str]) -> tuple[float, dict]:
    exe = Path(sys.executable).with_name("residscope")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per worker, and for the single process
    start = time.perf_counter()
    out = subprocess.run([str(exe), *args], check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env=env).stdout
    return time.perf_counter() - start, json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    base = ["bi", "--model", a.model, "--samples", str(a.samples), "--seq-len", str(a.seq_len),
            "--batch-size", str(a.batch_size), "--json"]
    results = {}
    for n in (1, 2):
        runs = [run(base + ["--nproc", str(n)]) for _ in range(a.repeats)]
        results[n] = (min(t for t, _ in runs), runs[0][1])
    tokens = a.samples * a.seq_len
    s1, s2 = (results[n][1]["scores"] for n in (1, 2))
    print(json.dumps({
        "model": a.model, "tokens": tokens, "threads_per_worker": 1,
        "wall_s": {n: round(results[n][0], 2) for n in results},
        "tokens_per_s": {n: round(tokens / results[n][0], 1) for n in results},
        "speedup_2_over_1": round(results[1][0] / results[2][0], 2),
        "max_rel_diff_scores": max(abs(x - y) / abs(x) for x, y in zip(s1, s2) if x),
    }))


if __name__ == "__main__":
    main()
