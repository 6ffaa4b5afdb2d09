"""Block Influence cost: time against a plain forward over the same tokens, and peak memory against the depth.

Compares, on random Llama models of growing depth (and on SmolLM2-135M with --real):
    forward     residscope Decoder, plain forward to logits
    bi          residscope.surgery.block_influence (hooks reduce each residual pair on the fly)
    hf-forward  transformers forward to logits
    hf-ref      the reference approach: transformers with output_hidden_states=True, then cosine per layer
Each measurement runs in a fresh subprocess; peak memory is the highest RSS sampled during the first run minus the RSS
just before it (model loaded and warmed up), so it counts activations only. Times: best of --repeat runs, in process
CPU seconds (time.process_time), which a shared, busy machine disturbs far less than wall-clock time.

    .venv/bin/python benchmarks/bench_block_influence.py [--depths 8,16,32] [--real]

With --sleb N, SLEB's greedy search for N blocks instead: residscope's (one forked forward per step: every candidate
shares the stream before its block, `runtime.forks`) against the straightforward implementation (a full forward of a
pruned copy per candidate, as the reference code does), on the same tokens: the picks must be equal; the table gives
both CPU times and their ratio.

    .venv/bin/python benchmarks/bench_block_influence.py --sleb 4 [--depths 8,16] [--batch 2 --seq-len 64] [--real]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

MODES = ("forward", "bi", "hf-forward", "hf-ref")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples RSS every millisecond in a thread while the block runs."""

    def __enter__(self):
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def child(mode: str, source: str, batch: int, seq_len: int, repeat: int) -> dict:
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from residscope.model import load_model

    gen = torch.Generator().manual_seed(0)
    if mode.startswith("hf"):
        import transformers

        from residscope.model.registry import resolve_source

        model = transformers.AutoModelForCausalLM.from_pretrained(resolve_source(source), dtype=torch.float32).eval()
        vocab = model.config.vocab_size
    else:
        model = load_model(source, load_tokenizer=False)
        vocab = model.cfg.d_vocab
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)

    def run():
        with torch.inference_mode():
            if mode == "forward":
                model(ids)
            elif mode == "bi":
                from residscope.surgery import block_influence

                block_influence(model, [ids], progress=False)
            elif mode == "hf-forward":
                model(ids)
            else:  # the reference: every hidden state kept, then cosine per consecutive pair
                hs = model(ids, output_hidden_states=True).hidden_states
                d = hs[0].shape[-1]
                scores = []
                for i in range(len(hs) - 1):
                    a, b = hs[i].reshape(-1, d), hs[i + 1].reshape(-1, d)
                    sim = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
                    scores.append(float((1 - sim.nan_to_num(nan=0.5)).mean()))

    with torch.inference_mode():  # warm-up on a short input: allocator and kernels ready, activations small
        (model(ids[:1, :8]))
    with PeakRSS() as mem:
        run()
    times = []
    for _ in range(repeat):
        t = time.process_time()
        run()
        times.append(time.process_time() - t)
    return {"mode": mode, "seconds": min(times), "extra_mb": mem.extra_mb}


def measure(mode: str, source: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--source", source, "--batch", str(args.batch),
           "--seq-len", str(args.seq_len), "--repeat", str(args.repeat)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def random_model(folder: str, n_layers: int, d_model: int) -> str:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=d_model, intermediate_size=int(d_model * 8 / 3) // 64 * 64,
                                   num_hidden_layers=n_layers, num_attention_heads=d_model // 64, num_key_value_heads=d_model // 64)
    path = os.path.join(folder, f"llama-{n_layers}")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def sleb_comparison(source: str, remove: int, batch: int, seq_len: int) -> dict:
    """SLEB fast vs naive on one model: picks, CPU seconds each (one run each, in this process)."""
    import torch

    from residscope.model import load_model
    from residscope.surgery.criteria import sleb_order

    model = load_model(source)
    gen = torch.Generator().manual_seed(0)
    data = list(torch.randint(0, model.cfg.d_vocab, (batch, seq_len), generator=gen).split(max(1, batch // 2)))
    out = {}
    for name, naive in (("fast", False), ("naive", True)):
        start = time.process_time()
        chosen = sleb_order(model, data, remove, progress=False, naive=naive)
        out[name] = {"seconds": time.process_time() - start, "order": chosen.order,
                     "ppl": [step["ppl"] for step in chosen.steps]}
    return out


def report(name: str, rows: dict[str, dict]) -> None:
    f, b, hf, ref = (rows[m] for m in MODES)
    print(f"{name:<22} {f['seconds']:>8.3f} {b['seconds']:>8.3f} {b['seconds'] / f['seconds']:>8.2f} "
          f"{ref['seconds'] / hf['seconds']:>9.2f} {ref['seconds'] / b['seconds']:>8.2f}   "
          f"{f['extra_mb']:>8.1f} {b['extra_mb']:>8.1f} {hf['extra_mb']:>8.1f} {ref['extra_mb']:>8.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="8,16,32")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--real", action="store_true", help="also SmolLM2-135M (smollm2-135m alias)")
    p.add_argument("--sleb", type=int, default=None, help="compare SLEB's greedy for this many blocks instead")
    p.add_argument("--child", choices=MODES)
    p.add_argument("--source")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.source, args.batch, args.seq_len, args.repeat)))
        return

    if args.sleb is not None:
        print(f"SLEB greedy, {args.sleb} blocks, {args.batch}x{args.seq_len} calibration tokens; CPU seconds, one run each")
        print(f"{'model':<22} {'fast s':>9} {'naive s':>9} {'naive/fast':>10}  same picks  picks")
        with tempfile.TemporaryDirectory() as tmp:
            sources = [(f"random llama L={n}", random_model(tmp, int(n), args.d_model)) for n in args.depths.split(",")]
            if args.real:
                sources.append(("SmolLM2-135M", "smollm2-135m"))
            for name, source in sources:
                r = sleb_comparison(source, args.sleb, args.batch, args.seq_len)
                fast, naive = r["fast"], r["naive"]
                print(f"{name:<22} {fast['seconds']:>9.2f} {naive['seconds']:>9.2f} "
                      f"{naive['seconds'] / fast['seconds']:>10.2f}  {str(fast['order'] == naive['order']):>10}  "
                      f"{fast['order']}", flush=True)
        return
    print(f"tokens per run: {args.batch}x{args.seq_len}; CPU seconds, best of {args.repeat}; memory = peak RSS above the loaded model")
    print(f"{'model':<22} {'fwd s':>8} {'bi s':>8} {'bi/fwd':>8} {'ref/hfwd':>9} {'ref/bi':>8}   "
          f"{'fwd MB':>8} {'bi MB':>8} {'hfwd MB':>8} {'ref MB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        sources = [(f"random llama L={n}", random_model(tmp, int(n), args.d_model)) for n in args.depths.split(",")]
        if args.real:
            sources.append(("SmolLM2-135M", "smollm2-135m"))
        for name, source in sources:
            report(name, {m: measure(m, source, args) for m in MODES})


if __name__ == "__main__":
    main()
