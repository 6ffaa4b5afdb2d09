"""Time the paper's table of RoPE base lower bounds (2^10 .. 2^20, head dim 128) and compare with a naive search.

    .venv/bin/python benchmarks/bench_rope_bound.py [--naive-lengths 1024,2048,4096,8192]

Naive: for each length separately, every base on the same log grid (1 + 1e-3)^k from k = 1 upward, B(m) computed
directly as sum(cos(m * theta)) for all m in [0, L] (no early exit, no witnesses), until the first base passes.
Reports wall and CPU seconds (on a shared machine wall time depends on the load; CPU time does not).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from residscope.analyses import rope_bound as rb


def naive_lower_bound(length: int, head_dim: int = 128, grid_step: float = 1e-3) -> float:
    m = torch.arange(length + 1, dtype=torch.float64)[:, None]  # [L + 1, 1]
    exps = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    k = 0
    while True:
        k += 1
        theta = torch.exp(-k * math.log1p(grid_step) * exps)  # [n]
        if (torch.cos(m * theta).sum(-1) >= 0).all():
            return math.exp(k * math.log1p(grid_step))


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--naive-lengths", default="1024,2048,4096", help="comma-separated lengths for the naive comparison")
    args = parser.parse_args()
    naive_lengths = [int(x) for x in args.naive_lengths.split(",") if x]
    torch.set_num_threads(1)  # same as the library's search; the naive side gets no unfair thread advantage either way
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")

    rows, wall, cpu = timed(lambda: rb.paper_table(128))
    print(f"full table (11 lengths, head dim 128, grid 1e-3, refined to 1e-6, all verified): {wall:.1f} s wall, {cpu:.1f} s CPU")
    for r in rows:
        pub = f"{r.published:.2g}" if r.published else "-"
        print(f"  {r.length:>9,}  {r.computed.value:>11.5g}  published {pub:>7}  verified={r.computed.verified}  {r.note}")

    fast, f_wall, f_cpu = timed(lambda: rb.base_lower_bounds(naive_lengths, 128))
    naive = []
    n_wall = n_cpu = 0.0
    for length in naive_lengths:
        value, w, c = timed(lambda: naive_lower_bound(length))
        naive.append(value)
        n_wall, n_cpu = n_wall + w, n_cpu + c
    for length, f, n in zip(naive_lengths, fast, naive):
        assert f.grid_value == n or math.isclose(f.grid_value, n, rel_tol=1e-9), (length, f.grid_value, n)
    print(f"lengths {naive_lengths}: ours {f_wall:.2f} s wall / {f_cpu:.2f} s CPU, naive grid scan {n_wall:.1f} s wall / "
          f"{n_cpu:.1f} s CPU -> {n_cpu / f_cpu:.0f}x faster (CPU), same grid answers")


if __name__ == "__main__":
    main()
