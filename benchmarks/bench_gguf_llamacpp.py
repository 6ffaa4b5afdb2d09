"""GGUF export against llama.cpp, and the "ShortGPT is orthogonal to quantization" table.

For the bundled SmolLM2-135M, dense and pruned (Block Influence, 8 of 30 layers), written as GGUF f32 / q8_0 / q4_0:
- residscope: the file read back through residscope's own GGUF loader (de-quantized weights), held-out perplexity on the
  built-in evaluation split, and for f32 the largest logit difference from the in-memory model;
- llama.cpp (when `llama-cpp-python` is installed; it is not a residscope dependency: `pip install llama-cpp-python`
  builds it from source with cmake and gcc): the same files, perplexity on the same token ids, the largest logit
  difference from residscope on one chunk, and whether the greedy continuation of a prompt is the same.

    python benchmarks/bench_gguf_llamacpp.py --out /tmp/gguf-bench [--samples 16] [--json results.json]

Prints a markdown table (the README's) and optionally writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from residscope.analyses.corpus import calibration_batches
from residscope.analyses.perplexity import perplexity
from residscope.model import load_model
from residscope.model.gguf_export import write_gguf
from residscope.surgery import block_influence_result, remove_layers

PROMPT = "The capital of France is"


def llama_cpp_model(path: Path, n_ctx: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0)


def llama_cpp_logits(llm, ids: list[int]) -> torch.Tensor:
    """Logits [pos, vocab] of llama.cpp for one sequence of token ids (fresh context)."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def llama_cpp_perplexity(llm, batches) -> float:
    total, n = 0.0, 0
    for batch in batches:
        for row in batch:
            ids = row.tolist()
            logp = llama_cpp_logits(llm, ids)[:-1].log_softmax(-1)  # [pos - 1, vocab]
            total -= float(logp.gather(-1, torch.tensor(ids[1:])[:, None]).double().sum())
            n += len(ids) - 1
    return math.exp(total / n)


def llama_cpp_greedy(llm, ids: list[int], n_new: int) -> list[int]:
    llm.reset()
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n_new:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, required=True, help="folder for the GGUF files")
    ap.add_argument("--remove", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--samples", type=int, default=32, help="held-out chunks (and calibration chunks for BI)")
    ap.add_argument("--quants", default="f32,q8_0,q4_0")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    dense = load_model(args.model)
    calib, _ = calibration_batches(dense, seq_len=args.seq_len, samples=args.samples, batch_size=4, seed=0)
    held, source = calibration_batches(dense, seq_len=args.seq_len, samples=args.samples, batch_size=4, seed=0,
                                       split="evaluation")
    bi = block_influence_result(dense, calib, "bi", progress=False)
    removed = bi.order()[: args.remove]
    pruned = remove_layers(dense, removed)
    prompt_ids = dense.to_tokens(PROMPT)[0].tolist()
    rows = []
    for name, model in (("dense", dense), (f"pruned (BI, {args.remove} of {dense.cfg.n_layers})", pruned)):
        t = time.time()
        ref_ppl = perplexity(model, held, progress=False).ppl
        ref_chunk = held[0][0].tolist()
        ref_logits = model(torch.tensor([ref_chunk]))[0].float()
        ref_greedy = model.generate(torch.tensor([prompt_ids]), max_new_tokens=16, stop_at_eos=False)[0, len(prompt_ids):].tolist()
        rows.append({"model": name, "format": "in memory (float32)", "ppl_residscope": ref_ppl, "ppl_llama_cpp": None,
                     "bytes": None, "seconds": time.time() - t})
        for quant in args.quants.split(","):
            t = time.time()
            path = args.out / f"{'dense' if model is dense else 'pruned'}-{quant}.gguf"
            written = write_gguf(model, path, quant=quant, force=True)
            back = load_model(path)
            row = {"model": name, "format": f"GGUF {quant}", "bytes": written.n_bytes,
                   "ppl_residscope": perplexity(back, held, progress=False).ppl,
                   "max_logit_diff_residscope": float((back(torch.tensor([ref_chunk]))[0].float() - ref_logits).abs().max())}
            del back
            llm = llama_cpp_model(path, n_ctx=max(args.seq_len, 512))
            if llm is not None:
                row["ppl_llama_cpp"] = llama_cpp_perplexity(llm, held)
                row["max_logit_diff_llama_cpp"] = float((llama_cpp_logits(llm, ref_chunk) - ref_logits).abs().max())
                greedy = llama_cpp_greedy(llm, prompt_ids, 16)
                row["greedy_same_as_residscope"] = greedy == ref_greedy
                row["llama_cpp_tokenizes_prompt_alike"] = llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == \
                    dense.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
                del llm
            else:
                row["ppl_llama_cpp"] = None
            row["seconds"] = time.time() - t
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"model": args.model, "removed_layers": removed, "heldout": source, "rows": rows,
              "greedy_prompt": PROMPT}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    dense_ppl = rows[0]["ppl_residscope"]
    print(f"\nheld-out perplexity, {source}; BI removes layers {sorted(removed)}")
    print("| model | format | size (MiB) | perplexity (residscope) | x dense | perplexity (llama.cpp) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        size = f"{r['bytes'] / 2**20:.0f}" if r["bytes"] else "-"
        lc = f"{r['ppl_llama_cpp']:.3f}" if r.get("ppl_llama_cpp") else "-"
        print(f"| {r['model']} | {r['format']} | {size} | {r['ppl_residscope']:.3f} | "
              f"{r['ppl_residscope'] / dense_ppl:.2f} | {lc} |")


if __name__ == "__main__":
    main()
