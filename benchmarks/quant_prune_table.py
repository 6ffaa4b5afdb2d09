"""The "ShortGPT is orthogonal to quantization" table, fast: held-out perplexity of dense, pruned (Block Influence),
quantized (q8_0, q4_0) and pruned + quantized SmolLM2-135M.

Quantized models are the in-memory model with every matrix replaced by what the GGUF file stores, de-quantized: the
same `gguf.quants` calls and the same per-tensor type rule as `residscope export --gguf` (`gguf_export.tensor_type` /
`encode_tensor`). tests/test_gguf_export.py proves that a written file reads back through residscope's GGUF loader with
exactly these parameters, so this skips writing and re-converting the files (the full path, and llama.cpp, is
benchmarks/bench_gguf_llamacpp.py).

    python benchmarks/quant_prune_table.py [--remove 8] [--samples 16] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import gguf
import numpy as np
import torch

from residscope.analyses.corpus import calibration_batches
from residscope.analyses.perplexity import perplexity
from residscope.model import load_model
from residscope.model.gguf_export import encode_tensor, gguf_tensor_name, tensor_type
from residscope.surgery import block_influence_result, remove_layers


def dequantized(model, quant: str):
    """A copy of `model` whose matrices hold the GGUF `quant` values, de-quantized (norms stay float32)."""
    from residscope.model.checkpoint import local_to_hf

    out = copy.deepcopy(model)
    tied = out.cfg.tie_embeddings
    params = dict(out.named_parameters())
    with torch.no_grad():
        hf_of = {v: k for k, v in local_to_hf({k: k for k in params}, out.cfg).items()}  # local name -> HF name
        for local, p in params.items():
            if local not in hf_of or p.dim() < 2:
                continue
            name = gguf_tensor_name(hf_of[local])
            kind = tensor_type(name, tuple(p.shape), quant, tied)
            data, raw = encode_tensor(p, kind)
            back = gguf.quants.dequantize(data, raw) if raw is not None else data.astype(np.float32)
            p.copy_(torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32)).reshape(p.shape))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--remove", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--samples", type=int, default=16)
    args = ap.parse_args()
    dense = load_model(args.model)
    calib, _ = calibration_batches(dense, seq_len=args.seq_len, samples=args.samples, batch_size=4, seed=0)
    held, source = calibration_batches(dense, seq_len=args.seq_len, samples=args.samples, batch_size=4, seed=0,
                                       split="evaluation")
    removed = block_influence_result(dense, calib, "bi", progress=False).order()[: args.remove]
    pruned = remove_layers(dense, removed)
    rows = []
    for label, model in (("dense", dense), (f"pruned (BI, {args.remove} of {dense.cfg.n_layers})", pruned)):
        for quant in ("f32", "q8_0", "q4_0"):
            t = time.time()
            m = model if quant == "f32" else dequantized(model, quant)
            rows.append({"model": label, "weights": quant, "ppl": perplexity(m, held, progress=False).ppl,
                         "seconds": round(time.time() - t, 1)})
            print(json.dumps(rows[-1]), flush=True)
            del m
    base = rows[0]["ppl"]
    print(f"\nheld-out perplexity on {source}; BI removes layers {sorted(removed)}")
    print("| model | weights | perplexity | x dense f32 |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['weights']} | {r['ppl']:.3f} | {r['ppl'] / base:.3f} |")


if __name__ == "__main__":
    main()
