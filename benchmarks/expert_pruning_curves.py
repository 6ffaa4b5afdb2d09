"""Expert pruning curves: held-out perplexity of zoo-moe (or --model) against the experts kept per layer, for every
criterion of `residscope.surgery.experts` (frequency, router-weight mass, REAP, Lu et al.'s reconstruction).

    python benchmarks/expert_pruning_curves.py                         # zoo-moe, keep 8..2, markdown table
    python benchmarks/expert_pruning_curves.py --html curves.html --json curves.json

Calibration: the built-in corpus's calibration split; evaluation: its held-out split (same sequences for every row).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="zoo-moe")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--eval-samples", type=int, default=32, help="held-out sequences")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--criteria", default="frequency,weight,reap,reconstruction")
    p.add_argument("--threads", type=int)
    p.add_argument("--html")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from residscope.analyses.corpus import calibration_batches
    from residscope.analyses.experts import routing_statistics
    from residscope.analyses.perplexity import perplexity
    from residscope.model import load_model
    from residscope.surgery.experts import choose_experts, prune_experts

    t0 = time.time()
    model = load_model(args.model)
    calib, calib_source = calibration_batches(model, seq_len=args.seq_len, samples=args.samples, batch_size=8)
    evals, eval_source = calibration_batches(model, seq_len=args.seq_len, samples=args.eval_samples, batch_size=8,
                                             split="evaluation")
    dense = perplexity(model, evals, progress=False).ppl
    stats = routing_statistics(model, calib, progress=False)  # one routing pass serves three criteria
    n, k = model.cfg.n_experts, model.cfg.experts_per_tok
    rows = []
    for criterion in args.criteria.split(","):
        for keep in range(n - 1, k - 1, -1):
            choice = choose_experts(model, calib, keep, criterion, stats=stats, progress=False)
            ppl = perplexity(prune_experts(model, choice.keep), evals, progress=False).ppl
            rows.append({"criterion": criterion, "keep": keep, "ppl": ppl})
            print(f"{criterion:<15} keep {keep}: {ppl:.3f}", file=sys.stderr, flush=True)
    keeps = sorted({r["keep"] for r in rows}, reverse=True)
    crits = list(dict.fromkeys(r["criterion"] for r in rows))
    table = [f"| experts kept (of {n}, top-{k}) | " + " | ".join(crits) + " |", "|---:|" + "---:|" * len(crits)]
    for keep in keeps:
        cells = [next(f"{r['ppl']:.2f}" for r in rows if r["criterion"] == c and r["keep"] == keep) for c in crits]
        table.append(f"| {keep} | " + " | ".join(cells) + " |")
    table.append(f"| {n} (all) | " + " | ".join(f"{dense:.2f}" for _ in crits) + " |")
    text = "\n".join(table)
    print(text)
    print(f"\nCalibration: {calib_source}; evaluation: {eval_source}; {time.time() - t0:.0f} s", file=sys.stderr)
    if args.html:
        from residscope.analyses.experts_plots import pruning_curves

        pruning_curves(rows, dense).write_html(args.html, include_plotlyjs="cdn")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense": dense, "rows": rows, "calibration": calib_source, "evaluation": eval_source}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
