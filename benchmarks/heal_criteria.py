"""Every pruning criterion on SmolLM2-135M, then healed: held-out perplexity before and after healing, one row each.

    nice -n 10 .venv/bin/python benchmarks/heal_criteria.py --out out/heal_criteria.json [--remove 8]
        [--calib-samples 2 --calib-len 64] [--eval-samples 4 --eval-len 128]
        [--steps 8 --micro 2 --train-len 128 --grad-accum 2 --lr 2e-4 --last-k 2]

Every criterion picks `--remove` blocks on the same calibration tokens (builtin calibration split); the pruned model is
scored on the same held-out tokens (evaluation split), healed by partial fine-tuning (last `--last-k` blocks and
lm_head, AdamW, `--steps` steps of `--micro` x `--train-len` tokens x `--grad-accum` from the calibration split), and
scored again. `llm-streamline` in --criteria adds LLM-Streamline's row: the most redundant --remove + 1 consecutive
blocks (angular distance on the calibration tokens) replaced by their first block, trained alone on the same
training tokens and steps (relative error to the stream leaving the span; `llm-streamline-mse`: the reference's plain
MSE; `--streamline-lr`, default --lr). Results are appended to the JSON file after each criterion, so an interrupted run resumes (--resume)
where it stopped. Sizes are options because this is CPU-heavy: the README table states the sizes it ran with.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

DEFAULT_CRITERIA = ("bi", "reverse", "angular", "angular-block", "taylor", "ppl", "sleb", "blockprune")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", type=Path, default=Path("out/heal_criteria.json"))
    p.add_argument("--criteria", default=",".join(DEFAULT_CRITERIA))
    p.add_argument("--remove", type=int, default=8)
    p.add_argument("--calib-samples", type=int, default=2)
    p.add_argument("--calib-len", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--eval-len", type=int, default=128)
    p.add_argument("--train-len", type=int, default=128)
    p.add_argument("--micro", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--train-samples", type=int, default=64, help="calibration-split sequences to train on (cycled)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--last-k", type=int, default=2)
    p.add_argument("--method", default="partial")
    p.add_argument("--streamline-lr", type=float, default=None, help="llm-streamline: learning rate (default --lr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-heal", action="store_true", help="only choose, prune and score before healing")
    args = p.parse_args(argv)

    from residscope.analyses.corpus import calibration_batches
    from residscope.analyses.perplexity import perplexity
    from residscope.common.atomic import atomic_write_text
    from residscope.model import load_model
    from residscope.surgery import remove_layers, remove_sublayers, streamline
    from residscope.surgery.criteria import selection
    from residscope.surgery.heal import heal

    report = json.loads(args.out.read_text()) if args.resume and args.out.exists() else {}
    save = lambda: atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")  # noqa: E731
    model = load_model(args.model)
    calib, calib_source = calibration_batches(model, seq_len=args.calib_len, samples=args.calib_samples,
                                              batch_size=args.calib_samples, seed=args.seed)
    evals, eval_source = calibration_batches(model, seq_len=args.eval_len, samples=args.eval_samples, batch_size=2,
                                             seed=args.seed, split="evaluation")
    train, train_source = calibration_batches(model, seq_len=args.train_len, samples=args.train_samples,
                                              batch_size=args.micro, seed=args.seed + 1)
    report.setdefault("settings", {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                   "calibration": calib_source, "evaluation": eval_source, "training": train_source,
                                   "threads": torch.get_num_threads()})
    if "dense" not in report:
        t = time.perf_counter()
        report["dense"] = {"ppl": perplexity(model, evals, progress=False).ppl, "seconds": time.perf_counter() - t}
        save()
    print(f"dense held-out perplexity {report['dense']['ppl']:.3f}", flush=True)
    rows = report.setdefault("rows", {})
    for criterion in args.criteria.split(","):
        if criterion in rows and ("after" in rows[criterion] or (args.no_heal and "before" in rows[criterion])):
            continue
        row = rows.setdefault(criterion, {})
        if criterion in ("llm-streamline", "llm-streamline-mse"):
            replaced = remove_layers(model, [])  # a copy: streamline changes the model it is given
            loss = "mse" if criterion.endswith("-mse") else "relative"
            result = streamline(replaced, train, evals, args.remove, select_batches=calib, loss=loss, steps=args.steps,
                                grad_accum=args.grad_accum, lr=args.streamline_lr or args.lr, seed=args.seed,
                                eval_every=max(1, args.steps // 2), progress=False)
            span = result.streamline
            row.update(order=span["removed"], replaced_by=span["start"], select_seconds=None, before=result.before,
                       after=result.after, heal_seconds=result.seconds, curve=result.curve,
                       recovered=result.recovered(report["dense"]["ppl"]), trainable_params=result.trainable_params,
                       mse_before=span["mse_before"], mse_after=span["mse_after"],
                       params=sum(p.numel() for p in replaced.parameters()))
            save()
            print(f"{criterion:<14} blocks {span['start']}-{span['removed'][-1]} -> block {span['start']}  ppl "
                  f"{result.before:.2f} -> {result.after:.2f} ({loss} stream error {span['mse_before']:.4g} -> "
                  f"{span['mse_after']:.4g}, {result.seconds:.0f} s)", flush=True)
            del replaced
            continue
        if "order" not in row:
            sel = selection(model, calib, args.remove, criterion, progress=False, seed=args.seed, source=calib_source)
            row.update(order=sel.to_dict()["order"], select_seconds=sel.seconds)
            save()
        order = [tuple(x) if isinstance(x, list) else x for x in row["order"]]
        if order and isinstance(order[0], tuple):
            pruned = remove_sublayers(model, attn=[i for i, part in order if part == "attn"],
                                      mlp=[i for i, part in order if part == "mlp"])
        else:
            pruned = remove_layers(model, order)
        row["params"] = sum(p.numel() for p in pruned.parameters())
        if args.no_heal:
            row["before"] = perplexity(pruned, evals, progress=False).ppl
            save()
            print(f"{criterion:<14} removed {row['order']}  ppl {row['before']:.2f} (select {row['select_seconds']:.0f} s)",
                  flush=True)
            continue
        result = heal(pruned, train, evals, method=args.method, last_k=args.last_k, steps=args.steps,
                      grad_accum=args.grad_accum, lr=args.lr, seed=args.seed, eval_every=max(1, args.steps // 2),
                      progress=False)
        row.update(before=result.before, after=result.after, heal_seconds=result.seconds, curve=result.curve,
                   recovered=result.recovered(report["dense"]["ppl"]), trainable_params=result.trainable_params)
        save()
        print(f"{criterion:<14} removed {row['order']}  ppl {result.before:.2f} -> {result.after:.2f} "
              f"(select {row['select_seconds']:.0f} s, heal {result.seconds:.0f} s)", flush=True)
        del pruned
    print(table(report))
    return 0


def table(report: dict) -> str:
    dense = report["dense"]["ppl"]
    lines = [f"| criterion | removed | perplexity before healing | after healing | gap closed | select s | heal s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["rows"].items():
        if "before" not in r:
            continue
        removed = ", ".join(f"{x[0]}.{x[1]}" if isinstance(x, list) else str(x) for x in r["order"])
        closed = f"{100 * r['recovered']:.0f}%" if r.get("recovered") is not None else "-"
        after = f"{r['after']:.2f}" if "after" in r else "(not healed)"
        heal_s = f"{r['heal_seconds']:.0f}" if "heal_seconds" in r else "-"
        select_s = f"{r['select_seconds']:.0f}" if r.get("select_seconds") is not None else "-"
        if "replaced_by" in r:
            removed += f" (block {r['replaced_by']} trained in their place)"
        lines.append(f"| {name} | {removed} | {r['before']:.2f} | {after} | {closed} | {select_s} | {heal_s} |")
    return f"dense {dense:.2f}\n" + "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
