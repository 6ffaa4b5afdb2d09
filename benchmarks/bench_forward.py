"""Forward time and peak memory: residscope vs transformers (SDPA) vs TransformerLens' TransformerBridge.

    python benchmarks/bench_forward.py                      # issue 2's workload: 4 x 1024 tokens, fp32, 1 warm-up + 5 repeats
    python benchmarks/bench_forward.py --quick              # smoke run: 1 x 256 tokens, 3 repeats (about a minute)
    python benchmarks/bench_forward.py --model smollm2-135m --json results.json
    python benchmarks/bench_forward.py --profile            # torch.profiler op tables of residscope and transformers
    python benchmarks/bench_forward.py --family gpt_neox --cases hf,rs --batch 1 --seq-len 512 --no-memory
                                                            # one model family at a small real checkpoint's shape
    python benchmarks/bench_forward.py --family qwen2_moe --threads 1 --no-memory   # issue 21: MoE forward

On a shared machine (load average above the core count) pass `--threads 1`: OpenMP threads that get descheduled spin at
barriers, and a 2-thread forward measured 6-17x slower than a 1-thread one under load 18 on 2 cores.

Checkpoint: by default a Llama with SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536,
vocab 49152, rope_theta 1e5, tied embeddings) with random weights, written with `save_pretrained` to a temp folder together
with a tiny word-level tokenizer (TransformerBridge insists on one). Speed does not depend on the weights. `--model` takes a
folder, GGUF file or alias instead (anything `residscope.model.registry.resolve_source` understands).

`--family qwen2_moe`: a Qwen1.5-MoE-A2.7B-shaped Qwen2-MoE (hidden 2048, 16 heads, 60 experts of 1408, top-4, shared
expert 5632, norm_topk_prob false) with random weights, shrunk to `--layers` layers (default 1) and a 32000-token vocabulary
(default) so that two copies fit in memory next to other work; every layer is sparse, so the time is the MoE MLP's and
attention's. transformers runs its default experts implementation (grouped_mm on CPU when available); the cases default
to hf,rs.

Cases, all under torch.inference_mode on the same input ids, in one process, timed interleaved (each repeat runs every case
once, so load from other processes on the machine spreads over all cases), median reported:
    hf            transformers LlamaForCausalLM, attn_implementation="sdpa": model(ids).logits
    rs            residscope Decoder: model(ids)
    hf_hidden     transformers with output_hidden_states=True (31 tensors)
    rs_resid      residscope run_with_cache(names_filter=lambda n: "hook_resid" in n) (90 tensors: pre/mid/post per layer)
    bridge        TransformerBridge.boot_transformers(folder): bridge(ids) (the bridge forces eager attention)
    bridge_cache  TransformerBridge run_with_cache() with every hook (attention scores and patterns included)

Peak memory: each case runs again in a fresh subprocess (this script with `--case NAME`) that loads only its model, runs a
tiny forward to initialise the kernels, then resets the kernel's RSS high-water mark (/proc/self/clear_refs) and runs one
forward at the full workload while keeping its outputs (logits, hidden states or cache) alive. Reported: peak RSS during
that forward minus RSS just before it, i.e. what one forward adds on top of the loaded model, outputs included. glibc's
mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so freed tensors go back to the OS and do not hide in the heap.

The script never asserts: it prints PASS/FAIL next to each target ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

CASES = ("hf", "rs", "hf_hidden", "rs_resid", "bridge", "bridge_cache")
DESCRIPTIONS = {
    "hf": "transformers (sdpa), no hooks",
    "rs": "residscope, no hooks",
    "hf_hidden": "transformers, output_hidden_states=True",
    "rs_resid": "residscope, cache every hook_resid_*",
    "bridge": "TransformerBridge, no cache",
    "bridge_cache": "TransformerBridge, run_with_cache() (all hooks)",
}
# (case, baseline, target ratio or None, reference ratio from the issue or None)
RATIOS = (
    ("rs", "hf", 1.05, None),
    ("rs_resid", "hf_hidden", 1.10, None),
    ("bridge", "hf", None, 1.72),
    ("bridge_cache", "hf", None, 2.8),
)
SMOLLM2_135M_SHAPE = dict(
    hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    intermediate_size=1536, vocab_size=49152, rope_theta=1e5, tie_word_embeddings=True, max_position_embeddings=8192,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=None,
)


# ---------------------------------------------------------------------------------------------------------------------
# checkpoint and models
# ---------------------------------------------------------------------------------------------------------------------
def write_random_checkpoint(folder: Path) -> Path:
    """A SmolLM2-135M-shaped Llama with random weights and a tiny word-level tokenizer, saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M_SHAPE)).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


# --family F: a random-weight checkpoint with the shape of a small real checkpoint of that family (speed does not
# depend on the weights). GPT-J has no small checkpoint: GPT-2 small's shape with GPT-J's layout.
FAMILY_SHAPES = {
    "gpt2": ("openai-community/gpt2", dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)),
    "gpt_neox": ("EleutherAI/pythia-160m", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                 intermediate_size=3072, vocab_size=50304, rotary_pct=0.25,
                                                 max_position_embeddings=2048, use_parallel_residual=True)),
    "gptj": ("GPT-J layout at GPT-2 small's shape", dict(n_embd=768, n_layer=12, n_head=12, rotary_dim=32,
                                                         n_positions=2048, vocab_size=50400)),
    "gpt_neo": ("EleutherAI/gpt-neo-125m", dict(hidden_size=768, num_layers=12, num_heads=12, window_size=256,
                                                attention_types=[[["global", "local"], 6]], max_position_embeddings=2048,
                                                vocab_size=50257)),
    "opt": ("facebook/opt-125m", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                                      max_position_embeddings=2048, vocab_size=50272)),
    "bloom": ("bigscience/bloom-560m", dict(hidden_size=1024, n_layer=24, n_head=16, vocab_size=250880)),
    # issue 21: Qwen1.5-MoE-A2.7B's layer shape (60 experts of 1408, top-4, shared expert 5632, norm_topk_prob false),
    # shrunk to --layers layers (default 1) and a --vocab vocabulary (default 32000) to fit beside transformers' copy
    "qwen2_moe": ("Qwen/Qwen1.5-MoE-A2.7B (layers and vocabulary shrunk)", dict(
        hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, intermediate_size=5632,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
        norm_topk_prob=False, decoder_sparse_step=1, max_position_embeddings=8192, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, num_hidden_layers=1, vocab_size=32000)),
    # issue 20's RMS families at a small real checkpoint's layer shape; depth shrunk where two fp32 copies of the full
    # model would not fit beside other work (time per layer is what the ratio measures; the unembedding stays full)
    "qwen3": ("Qwen/Qwen3-0.6B", dict(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=3072, vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=True)),
    "gemma": ("google/gemma-2b (18 -> 6 layers)", dict(
        hidden_size=2048, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
        intermediate_size=16384, vocab_size=256000, max_position_embeddings=8192)),
    "gemma2": ("google/gemma-2-2b (26 -> 6 layers)", dict(
        hidden_size=2304, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        intermediate_size=9216, vocab_size=256000, sliding_window=4096, query_pre_attn_scalar=256,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "phi3": ("microsoft/Phi-3-mini-4k-instruct (32 -> 6 layers)", dict(
        hidden_size=3072, num_hidden_layers=6, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=8192, vocab_size=32064, max_position_embeddings=4096, sliding_window=None)),
    "olmo2": ("allenai/OLMo-2-0425-1B", dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
        intermediate_size=8192, vocab_size=100352, max_position_embeddings=4096, rope_theta=5e5)),
    "olmo3": ("allenai/Olmo-3-1025-7B (32 -> 4 layers: 3 sliding, 1 full)", dict(
        hidden_size=4096, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, vocab_size=100278, max_position_embeddings=65536, sliding_window=4096,
        layer_types=["sliding_attention"] * 3 + ["full_attention"])),
    "granite": ("ibm-granite/granite-3.0-2b-base (40 -> 10 layers)", dict(
        hidden_size=2048, num_hidden_layers=10, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=49155, max_position_embeddings=4096, embedding_multiplier=12.0,
        residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=8.0, tie_word_embeddings=True)),
    "smollm3": ("HuggingFaceTB/SmolLM3-3B (36 -> 8 layers, every 4th without RoPE)", dict(
        hidden_size=2048, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
        intermediate_size=11008, vocab_size=128256, max_position_embeddings=65536, rope_theta=5e6,
        no_rope_layers=[1, 1, 1, 0, 1, 1, 1, 0], tie_word_embeddings=True)),
    # issue 21's other MoE families, one layer and a 32000-token vocabulary like qwen2_moe
    "qwen3_moe": ("Qwen/Qwen3-30B-A3B (layers and vocabulary shrunk)", dict(
        hidden_size=2048, num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        vocab_size=32000, tie_word_embeddings=False)),
    "mixtral": ("mistralai/Mixtral-8x7B-v0.1 (layers and vocabulary shrunk)", dict(
        hidden_size=4096, num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)),
    "gpt_oss": ("openai/gpt-oss-20b (24 -> 2 layers: sliding, full; vocabulary shrunk)", dict(
        hidden_size=2880, num_hidden_layers=2, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
        intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"], vocab_size=32000)),
    "olmoe": ("allenai/OLMoE-1B-7B-0924 (layers and vocabulary shrunk)", dict(
        hidden_size=2048, num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=16,
        intermediate_size=1024, num_experts=64, num_experts_per_tok=8, vocab_size=32000)),
}


def write_family_checkpoint(folder: Path, family_name: str, **overrides) -> tuple[Path, str]:
    """A random-weight checkpoint of `family_name` at FAMILY_SHAPES' shape (with `overrides`), with the tiny tokenizer;
    (folder, label)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    label, shape = FAMILY_SHAPES[family_name]
    shape = {**shape, **{k: v for k, v in overrides.items() if v is not None}}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(family_name, **shape)).save_pretrained(folder)
    write_tokenizer(folder)
    return folder, f"random-weight {family_name} with {label}'s shape, save_pretrained to a temp folder"


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def load_hf(folder: Path):
    """transformers with SDPA attention; architectures without an SDPA path (GPT-Neo, BLOOM) with their only one."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    except ValueError as e:
        if "scaled_dot_product_attention" not in str(e):
            raise
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def load_rs(folder: Path):
    from residscope.model import load_model

    return load_model(folder, dtype=torch.float32, load_tokenizer=False).eval()


def load_bridge(folder: Path):
    """TransformerBridge from a local folder, hub off. Needs a tokenizer in the folder (or it refuses to boot)."""
    from transformer_lens import TransformerBridge

    return TransformerBridge.boot_transformers(str(folder), device="cpu", dtype=torch.float32).eval()


def runner(case: str, model):
    """A no-argument callable running `case` on ids; returns what the user would keep (logits, hidden states, cache)."""
    if case == "hf":
        return lambda ids: model(ids).logits
    if case == "hf_hidden":
        return lambda ids: (lambda out: (out.logits, out.hidden_states))(model(ids, output_hidden_states=True))
    if case == "rs":
        return lambda ids: model(ids)
    if case == "rs_resid":
        return lambda ids: model.run_with_cache(ids, names_filter=lambda n: "hook_resid" in n)
    if case == "bridge":
        return lambda ids: model(ids)
    if case == "bridge_cache":
        return lambda ids: model.run_with_cache(ids)
    raise ValueError(f"--case: unknown case {case!r} (choose from {', '.join(CASES)})")


def family(case: str) -> str:
    return {"hf": "hf", "hf_hidden": "hf", "rs": "rs", "rs_resid": "rs", "bridge": "bridge", "bridge_cache": "bridge"}[case]


LOADERS = {"hf": load_hf, "rs": load_rs, "bridge": load_bridge}


# ---------------------------------------------------------------------------------------------------------------------
# memory helpers
# ---------------------------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def mem_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def storage_bytes(cache) -> int:
    """Bytes held by the distinct storages of a cache (aliased hook_in/hook_out tensors counted once)."""
    seen = {}
    for v in cache.values():
        if isinstance(v, torch.Tensor):
            s = v.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def estimate_bridge_cache_bytes(bridge, batch: int, seq_len: int, vocab: int) -> int:
    """Full-cache size at [batch, seq_len] from two short runs: bytes(p) = a p + c p^2 per sequence (c: scores + patterns)."""
    sizes = {}
    with torch.inference_mode():
        for p in (32, 64):
            _, cache = bridge.run_with_cache(torch.randint(0, vocab, (1, p)))
            sizes[p] = storage_bytes(cache)
            del cache
    c = (sizes[64] - 2 * sizes[32]) / (64 * 64 - 2 * 32 * 32)
    a = (sizes[32] - c * 32 * 32) / 32
    return int(batch * (a * seq_len + c * seq_len * seq_len))


# ---------------------------------------------------------------------------------------------------------------------
# --case: one case in a fresh process, prints one JSON line
# ---------------------------------------------------------------------------------------------------------------------
def measure_case_memory(case: str, folder: Path, batch: int, seq_len: int) -> dict:
    model = LOADERS[family(case)](folder)
    vocab = model.config.vocab_size if family(case) == "hf" else (model.cfg.d_vocab)
    run = runner(case, model)
    with torch.inference_mode():
        run(torch.randint(0, vocab, (1, 8)))  # initialise kernels and lazy state outside the measured window
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    gc.collect()
    before_kib = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (not reset: includes loading)"
    with torch.inference_mode():
        out = run(ids)
        peak_kib = _status_kib("VmHWM") if method.startswith("VmHWM") else None
    if peak_kib is None:
        import resource

        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    return dict(case=case, rss_loaded_mib=before_kib / 1024, peak_mib=peak_kib / 1024,
                extra_mib=(peak_kib - before_kib) / 1024, method=method)


def memory_in_subprocess(case: str, folder: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--model", str(folder),
           "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(case=case, error=f"subprocess exited {proc.returncode}: {err}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------------------------------
# main benchmark
# ---------------------------------------------------------------------------------------------------------------------
def sanity_check(models: dict, vocab: int) -> dict:
    """Max |logit diff| vs transformers on a short input, and the number of cached tensors per caching case."""
    ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(1))
    out = {}
    with torch.inference_mode():
        ref = models["hf"](ids).logits
        out["hf_hidden_states"] = len(models["hf"](ids, output_hidden_states=True).hidden_states)
        if "rs" in models:
            out["rs_max_abs_logit_diff"] = (models["rs"](ids) - ref).abs().max().item()
            _, cache = models["rs"].run_with_cache(ids, names_filter=lambda n: "hook_resid" in n)
            out["rs_resid_cached_tensors"] = len(cache)
        if "bridge" in models:
            out["bridge_max_abs_logit_diff"] = (models["bridge"](ids) - ref).abs().max().item()
            _, cache = models["bridge"].run_with_cache(ids)
            out["bridge_cached_tensors"] = len(cache)
    return out


def time_cases(runs: dict, ids: torch.Tensor, warmup: int, repeats: int, log) -> tuple[dict, dict]:
    """Wall and process-CPU seconds per case. With one torch thread the CPU seconds are the forward's own work, which
    other jobs on a shared machine do not inflate (their wall seconds they do)."""
    times = {case: [] for case in runs}
    cpu = {case: [] for case in runs}
    for rep in range(warmup + repeats):
        label = f"warm-up {rep + 1}/{warmup}" if rep < warmup else f"repeat {rep - warmup + 1}/{repeats}"
        for case, run in runs.items():
            gc.collect()
            with torch.inference_mode():
                t0, c0 = time.perf_counter(), time.process_time()
                out = run(ids)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
            del out
            if rep >= warmup:
                times[case].append(dt)
                cpu[case].append(dc)
            log(f"  {label}  {case:<13} {dt:8.2f} s  ({dc:.2f} CPU s)")
    return times, cpu


def profile(models: dict, ids: torch.Tensor, log) -> dict:
    """torch.profiler op tables (self CPU time) for one forward of residscope and transformers, each after a warm-up."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    tables = {}
    for case in ("hf", "rs", "hf_hidden", "rs_resid"):
        if family(case) not in models:
            continue
        run = runner(case, models[family(case)])
        with torch.inference_mode():
            run(ids)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                run(ids)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=45)
        tables[case] = table
        log(f"\n### torch.profiler: {case} ({DESCRIPTIONS[case]})\n{table}")
    return tables


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def markdown(result: dict) -> str:
    med, mem = result["median_s"], result["memory"]
    hf, hf_hidden = med.get("hf"), med.get("hf_hidden")
    ratio_note = {case: (base, target, ref) for case, base, target, ref in RATIOS}
    lines = [
        f"Workload: {result['batch']} x {result['seq_len']} tokens, fp32, CPU ({result['threads']} threads), "
        f"torch.inference_mode, {result['warmup']} warm-up + {result['repeats']} repeats, median. "
        f"Checkpoint: {result['checkpoint']}.",
        "",
        "| case | median time (s) | min-max (s) | vs transformers | vs transformers + hidden states | target | median CPU s (vs transformers) | peak extra memory (MiB) |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for case in CASES:
        if case in result.get("skipped", {}):
            lines.append(f"| {DESCRIPTIONS[case]} | skipped | | | | | | |")
            continue
        if case not in med:
            continue
        ts = result["times_s"][case]
        r_hf = f"{med[case] / hf:.2f}x" if hf else ""
        r_hid = f"{med[case] / hf_hidden:.2f}x" if hf_hidden and case in ("rs_resid", "hf_hidden", "bridge_cache") else ""
        target = ""
        if case in ratio_note:
            base, tgt, ref = ratio_note[case]
            ratio = med[case] / med[base] if med.get(base) else None
            if tgt is not None and ratio is not None:
                target = f"<= {tgt:.2f}x vs {'transformers' if base == 'hf' else 'hidden states'}: " + ("PASS" if ratio <= tgt else "FAIL")
            elif ref is not None:
                target = f"issue's reference {ref}x"
        m = mem.get(case, {})
        m_txt = f"{m['extra_mib']:.0f}" if "extra_mib" in m else ("n/a" if not m else "error")
        cpu = result.get("median_cpu_s", {})
        c_txt = (f"{cpu[case]:.2f} ({cpu[case] / cpu['hf']:.2f}x)" if case in cpu and cpu.get("hf") else "")
        lines.append(f"| {DESCRIPTIONS[case]} | {med[case]:.2f} | {min(ts):.2f}-{max(ts):.2f} | {r_hf} | {r_hid} | {target} | {c_txt} | {m_txt} |")
    lines += ["", f"Command: `{result['command']}`",
              f"Machine: {result['machine']}; load average before / after: {result['load_before']} / {result['load_after']}."]
    for case, why in result.get("skipped", {}).items():
        lines.append(f"Skipped {case}: {why}")
    for case, m in mem.items():
        if "error" in m:
            lines.append(f"Memory of {case} not measured: {m['error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder, GGUF file or alias (default: random SmolLM2-135M-shaped Llama)")
    p.add_argument("--family", choices=sorted(FAMILY_SHAPES),
                   help="random-weight checkpoint of this model family at a small real checkpoint's shape (see FAMILY_SHAPES)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="1 x 256 tokens, 3 repeats (overrides --batch/--seq-len/--repeats)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--no-memory", action="store_true", help="skip the per-case peak-memory subprocesses")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler op tables of residscope and transformers")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-' for stdout, then the log goes to stderr)")
    p.add_argument("--layers", type=int, help="--family: number of layers (default: FAMILY_SHAPES')")
    p.add_argument("--vocab", type=int, help="--family: vocabulary size (default: FAMILY_SHAPES')")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: memory of one case in this fresh process
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.repeats = 1, 256, 3
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.case:
        print(json.dumps(measure_case_memory(args.case, Path(args.model), args.batch, args.seq_len)))
        return 0

    if args.family and args.cases == ",".join(CASES):
        args.cases = "hf,rs"
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"--cases: unknown case {unknown[0]!r} (choose from {', '.join(CASES)})")
    if "hf" not in cases:
        cases.insert(0, "hf")  # every ratio needs the baseline
    stream = sys.stderr if args.json == "-" else sys.stdout

    def log(msg: str) -> None:
        print(msg, file=stream, flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="residscope-bench-")
    if args.model and args.family:
        p.error("--model and --family: pass one")
    if args.family:
        folder, checkpoint = write_family_checkpoint(Path(tmp.name) / args.family, args.family,
                                                     num_hidden_layers=args.layers, vocab_size=args.vocab)
    elif args.model:
        from residscope.model.registry import resolve_source

        try:
            folder = resolve_source(args.model)
        except Exception as e:  # noqa: BLE001 - one line naming the argument
            p.error(f"--model {args.model}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        checkpoint = f"{args.model} ({folder})"
    else:
        folder = write_random_checkpoint(Path(tmp.name) / "smollm2-135m-shaped")
        checkpoint = "random-weight Llama with SmolLM2-135M's shape (135M parameters), save_pretrained to a temp folder"
    log(f"checkpoint: {folder}")

    result = dict(command="python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                  checkpoint=checkpoint, batch=args.batch, seq_len=args.seq_len, warmup=args.warmup, repeats=args.repeats,
                  threads=torch.get_num_threads(), load_before=load_average(),
                  machine=f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}",
                  skipped={}, memory={})
    import transformer_lens
    import transformers

    result["versions"] = dict(torch=torch.__version__, transformers=transformers.__version__,
                              transformer_lens=getattr(transformer_lens, "__version__", "?"))

    models = {}
    for fam in ("hf", "rs", "bridge"):
        if not any(family(c) == fam for c in cases):
            continue
        t0 = time.perf_counter()
        try:
            models[fam] = LOADERS[fam](folder)
        except Exception as e:  # noqa: BLE001 - the bridge may not boot offline; say why and go on
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            for c in cases:
                if family(c) == fam:
                    result["skipped"][c] = f"could not load ({why})"
            log(f"{fam}: not loaded: {why}")
            continue
        log(f"{fam}: loaded in {time.perf_counter() - t0:.1f} s")
    cases = [c for c in cases if c not in result["skipped"]]
    vocab = models["hf"].config.vocab_size

    if "bridge_cache" in cases:
        need = estimate_bridge_cache_bytes(models["bridge"], args.batch, args.seq_len, vocab)
        avail = mem_available_bytes()
        result["bridge_cache_estimate_gib"] = need / 2**30
        log(f"bridge full cache at {args.batch} x {args.seq_len}: about {need / 2**30:.1f} GiB "
            f"(available: {avail / 2**30:.1f} GiB)" if avail else "")
        if avail is not None and need > 0.7 * avail:
            result["skipped"]["bridge_cache"] = (f"its cache would take about {need / 2**30:.1f} GiB, more than 70% of the "
                                                 f"{avail / 2**30:.1f} GiB available; rerun with a smaller --batch/--seq-len")
            cases.remove("bridge_cache")

    result["sanity"] = sanity_check(models, vocab)
    log(f"sanity: {result['sanity']}")

    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    if args.threads != 1 and torch.get_num_threads() > 1 and os.getloadavg()[0] > (os.cpu_count() or 1):
        log(f"warning: load average {os.getloadavg()[0]:.1f} > {os.cpu_count()} cores with {torch.get_num_threads()} torch "
            "threads: OpenMP oversubscription makes times meaningless; consider --threads 1")
    log(f"timing {', '.join(cases)} on {args.batch} x {args.seq_len} tokens (load average {result['load_before']})")
    runs = {c: runner(c, models[family(c)]) for c in cases}
    times, cpu = time_cases(runs, ids, args.warmup, args.repeats, log)
    result["times_s"], result["cpu_s"] = times, cpu
    result["median_s"] = {c: statistics.median(ts) for c, ts in times.items()}
    result["median_cpu_s"] = {c: statistics.median(ts) for c, ts in cpu.items()}
    result["ratios"] = {f"{c}/{b}": result["median_s"][c] / result["median_s"][b]
                        for c, b, _, _ in RATIOS if c in result["median_s"] and b in result["median_s"]}
    result["cpu_ratios"] = {f"{c}/{b}": result["median_cpu_s"][c] / result["median_cpu_s"][b]
                            for c, b, _, _ in RATIOS if c in result["median_cpu_s"] and b in result["median_cpu_s"]}
    result["targets"] = {f"{c}/{b}": ("PASS" if result["ratios"][f"{c}/{b}"] <= t else "FAIL")
                         for c, b, t, _ in RATIOS if t is not None and f"{c}/{b}" in result["ratios"]}

    if args.profile:
        result["profile"] = profile(models, ids, log)

    del runs, models
    gc.collect()
    if not args.no_memory:
        for c in cases:
            log(f"memory: {c} in a fresh process ...")
            result["memory"][c] = memory_in_subprocess(c, folder, args)
            log(f"  {result['memory'][c]}")
    result["load_after"] = load_average()
    table = markdown(result)
    result["markdown"] = table
    log("\n" + table)
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            tmp_path = Path(args.json).with_suffix(".tmp")
            tmp_path.write_text(text)
            tmp_path.replace(args.json)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
