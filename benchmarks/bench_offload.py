"""Block-streamed Block Influence on a random Llama written to disk shard by shard (never built in memory).

    python benchmarks/bench_offload.py --dir /work/bench-offload-tmp                 # 13B-shaped, bf16 on disk (~26 GB)
    python benchmarks/bench_offload.py --dir /tmp/x --layers 8 --d-model 1024 --d-mlp 2816 --vocab 1024 --dtype float32

Writes the checkpoint (one safetensors shard per layer), then in a fresh process loads it with `offload=True` and scores
Block Influence over `--batches` x `--seq-len` random tokens; prints one JSON line: checkpoint size, peak RSS growth over
the process's RSS before loading and over its RSS once the resident parts are loaded (ru_maxrss), wall time, disk read throughput, and the share of time spent computing.
`--delete` removes the checkpoint afterwards. The checkpoint is written once and reused when its config matches.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

LLAMA_13B = dict(layers=40, d_model=5120, d_mlp=13824, heads=40, vocab=32000)


def config_dict(a) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.d_model,
            "intermediate_size": a.d_mlp, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
            "num_key_value_heads": a.heads, "vocab_size": a.vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": a.dtype}


def write_checkpoint(a, folder: Path) -> None:
    """One shard per layer plus one for the embeddings/norm/unembedding, each built and written alone."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, a.dtype)
    gen = torch.Generator().manual_seed(0)
    # Drawing 13e9 normal numbers takes most of an hour on two shared cores; the benchmark measures reads, memory and
    # matmuls, for which a pool of 2**20 + 7 normal draws, tiled with a different shift per tensor, serves as well.
    pool = (torch.randn(2**20 + 7, generator=gen) * 0.02).to(dtype)
    shift = iter(range(0, 10**9, 7919))

    def rand(*shape) -> torch.Tensor:
        numel = shape[0] * shape[1]
        tiled = torch.roll(pool, next(shift) % pool.numel()).repeat(numel // pool.numel() + 1)
        return tiled[:numel].view(*shape).clone()

    folder.mkdir(parents=True, exist_ok=True)
    d, f = a.d_model, a.d_mlp
    shards = {f"model-{0:05d}.safetensors": lambda: {
        "model.embed_tokens.weight": rand(a.vocab, d), "model.norm.weight": torch.ones(d, dtype=dtype),
        "lm_head.weight": rand(a.vocab, d)}}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        shards[f"model-{i + 1:05d}.safetensors"] = lambda p=p: {
            p + "input_layernorm.weight": torch.ones(d, dtype=dtype), p + "post_attention_layernorm.weight": torch.ones(d, dtype=dtype),
            **{p + f"self_attn.{n}_proj.weight": rand(d, d) for n in "qkvo"},
            p + "mlp.gate_proj.weight": rand(f, d), p + "mlp.up_proj.weight": rand(f, d), p + "mlp.down_proj.weight": rand(d, f)}
    weight_map = {}
    for name, build in shards.items():
        tensors = build()
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
        print(f"wrote {name}", file=sys.stderr, flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config_dict(a), indent=1))  # last: marks a complete checkpoint


def current_rss() -> int:
    """Resident bytes of this process now (Linux /proc; ru_maxrss gives only the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(folder: str, batches: int, seq_len: int, compute_dtype: str, activations: str) -> dict:
    """Runs in a fresh process: peak RSS growth is counted from just before loading."""
    import torch

    from residscope.model import load_model
    from residscope.surgery import block_influence_result

    torch.manual_seed(0)
    before = current_rss()
    start = time.perf_counter()
    model = load_model(folder, dtype=compute_dtype, offload=True, load_tokenizer=False)
    model.offload.activations = activations
    loaded = current_rss()  # resident parts (embeddings, final norm, unembedding) and imports
    data = list(torch.randint(0, model.cfg.d_vocab, (batches, seq_len)).split(1))
    result = block_influence_result(model, data, progress=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    stats = model.offload.stats
    size = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    return dict(checkpoint_gb=size / 1e9, layers=model.cfg.n_layers, tokens=batches * seq_len, compute_dtype=compute_dtype,
                threads=torch.get_num_threads(), wall_s=wall, resident_and_imports_gb=(loaded - before) / 1e9,
                peak_rss_growth_gb=(peak - before) / 1e9, streaming_rss_growth_gb=(peak - loaded) / 1e9,
                streaming_rss_growth_over_checkpoint=(peak - loaded) / size, read_gb=stats.read_bytes / 1e9,
                read_s=stats.read_seconds, read_gb_per_s=stats.read_bytes / 1e9 / max(stats.read_seconds, 1e-9),
                compute_s=stats.compute_seconds, waiting_for_reads_s=stats.wait_seconds,
                compute_share=stats.compute_seconds / wall, bi_first_layers=result.scores[:4].tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="where the random checkpoint is written (outside the repository)")
    for key, value in LLAMA_13B.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    ap.add_argument("--dtype", default="bfloat16", help="dtype on disk")
    ap.add_argument("--compute-dtype", default=None, help="dtype of the forward (default: the disk dtype)")
    ap.add_argument("--activations", default="device", choices=["device", "cpu"])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--delete", action="store_true", help="delete the checkpoint afterwards")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child process
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.dir, a.batches, a.seq_len, a.compute_dtype or a.dtype, a.activations)))
        return
    folder = Path(a.dir)
    config = folder / "config.json"
    if not (config.is_file() and json.loads(config.read_text()) == config_dict(a)):
        write_checkpoint(a, folder)
    try:
        child = [sys.executable, __file__, "--measure", *sys.argv[1:]]
        out = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True).stdout
        print(out.strip().splitlines()[-1])
    finally:
        if a.delete:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
