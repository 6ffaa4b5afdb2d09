"""Attention statistics and per-position loss at 16k and 32k tokens on SmolLM2-135M: peak memory and time against a
plain transformers SDPA forward at the same length, in one run.

    python benchmarks/bench_long_context.py                       # 16,384 and 32,768 tokens, builtin:plays/evaluation
    python benchmarks/bench_long_context.py --lengths 16384 --skip-hf

Cases, each in a fresh process (peak RSS = the child's ru_maxrss, loading included; time = the child's process CPU
seconds over the measured call, all threads, so that other jobs on a shared machine do not enter the ratio; wall
seconds are printed too), one JSON line each:
    sinks   residscope: `long_context_statistics(statistics=("sinks",))`: attention on each of the first 4 tokens for
            all 30 layers x 9 heads by query position, and the per-position loss, in one forward (the issue's target
            case); sinks come from the fused attention kernel's log-sum-exp, logits 1,024 positions at a time
    stats   the same with every statistic: also entropy and mean attended distance (extra value columns in the kernel)
    hf      transformers LlamaForCausalLM, attn_implementation="sdpa": model(ids).logits (every position's logits, what
            a per-position loss needs; no attention statistics)
Target (issue 22): sinks + per-position loss at 16k within 1.3x of hf's time and under 4 GiB peak RSS; 32k on the
same machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _ids(model, length: int) -> torch.Tensor:
    from residscope.analyses.long_context import long_context_batches

    return long_context_batches(model, length, 1)[0][0]  # [1, length]


def run_case(case: str, length: int) -> dict:
    from residscope.model import load_model

    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    ids = _ids(model, length)
    if case in ("stats", "sinks"):
        from residscope.analyses.long_context import long_context_statistics

        need = ("sinks",) if case == "sinks" else ("sinks", "distance", "entropy")
        t0, c0 = time.perf_counter(), time.process_time()
        stats = long_context_statistics(model, [ids], first_k=4, statistics=need, progress=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        extra = dict(loss=stats.loss, sink_mass_mean=float(stats.sink_mass.mean()))
    else:
        from transformers import AutoModelForCausalLM

        from residscope.model.registry import resolve_source

        folder = resolve_source("smollm2-135m")
        del model
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
        with torch.inference_mode():
            t0, c0 = time.perf_counter(), time.process_time()
            logits = hf(ids).logits
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
        extra = dict(loss=loss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(case=case, length=length, seconds=seconds, cpu_seconds=cpu, peak_rss_gib=peak / 2**30,
                threads=torch.get_num_threads(),
                **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--cases", default="sinks,stats", help="comma-separated residscope cases: sinks, stats "
                        "(default: both)")
    parser.add_argument("--case", choices=("sinks", "stats", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.length)))
        return
    unknown = [c for c in args.cases.split(",") if c not in ("sinks", "stats")]
    if unknown:
        parser.error(f"--cases: unknown case {unknown[0]!r} (choose from sinks, stats)")
    results = []
    for length in [int(x) for x in args.lengths.split(",")]:
        # the transformers baseline only at the first length (its logits alone are 6.4 GB at 32k)
        cases = args.cases.split(",") + ([] if args.skip_hf or results else ["hf"])
        for case in cases:
            out = subprocess.run([sys.executable, __file__, "--case", case, "--length", str(length)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(row)
            print(f"{case:>5} @ {length:>6,} tokens: {row['cpu_seconds']:8.1f} CPU s ({row['seconds']:.1f} s wall), "
                  f"peak RSS {row['peak_rss_gib']:.2f} GiB, "
                  f"loss {row['loss']:.3f}", flush=True)
    by = {(r["case"], r["length"]): r for r in results}
    for length in sorted({r["length"] for r in results}):
        if ("hf", length) in by:
            for case in [c for c in ("sinks", "stats") if (c, length) in by]:
                ratio = by[case, length]["cpu_seconds"] / by["hf", length]["cpu_seconds"]
                print(f"ratio {case} / transformers SDPA forward at {length:,} tokens: {ratio:.2f}x (process CPU seconds)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
