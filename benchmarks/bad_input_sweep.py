"""Bad-input sweep (issues 14 and 24, CLI side): the real `residscope` console script, one subprocess per case, on the
zoo models.

    python benchmarks/bad_input_sweep.py          # prints CLEAN/FAIL per case, a table per class, "N clean of M tried"

A case is clean when the exit code is the promised one (2 for bad input, with exactly one `residscope: error:` line on
stderr naming the culprit; 0 with exactly one warning line for a legitimate but unusual run; 130 after Ctrl-C) and the
user's files are untouched. Unlike tests/test_bad_inputs.py (in process, monkeypatched where needed), this runs the
installed command end to end, SIGKILLs a real prune and interrupts a real rope-bound. Unwritable folders use
`chattr +i` when run as root (root ignores permission bits). ~35 minutes on a busy 2-core machine, mostly start-up.

Each case belongs to a class (the root causes of issue 24); the closing table counts clean cases per class, the table
the README's "Bad input" section shows. A new option, format or file kind adds its cases to the class it belongs to.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESIDSCOPE = str(Path(sys.executable).with_name("residscope"))
ZOO = Path(__file__).resolve().parent.parent / "model" / "zoo"
ENV = dict(os.environ, OMP_NUM_THREADS="1")
FAST = ["--seq-len", "32", "--samples", "2", "--batch-size", "2"]
results: list[tuple[str, str, bool]] = []  # (class, label, clean)
CLASS = ["files at risk"]  # the class the next cases belong to (set by each group)


def stderr_lines(stderr: str) -> list[str]:
    """stderr without tqdm's progress-bar redraws."""
    return [line for line in stderr.splitlines() if line.strip() and "\r" not in line and "it/s" not in line
            and "s/it" not in line]


def report(label: str, ok: bool, detail: str) -> None:
    results.append((CLASS[0], label, ok))
    print(f"{'CLEAN' if ok else 'FAIL '} {label:<52} | {detail[:150]}", flush=True)


def case(label: str, argv: list, *, code: int = 2, culprit: str | None = None, warning: str | None = None,
         check=None, env: dict | None = None) -> None:
    """Run `residscope argv`; clean when the exit code is `code` and stderr is what the contract promises."""
    p = subprocess.run([RESIDSCOPE, *map(str, argv)], capture_output=True, text=True, env={**ENV, **(env or {})},
                       timeout=900)
    lines = stderr_lines(p.stderr)
    ok = p.returncode == code
    if code == 2:
        ok = ok and len(lines) == 1 and lines[0].startswith("residscope: error: ") and (culprit or "") in lines[0]
    if warning is not None:
        ok = ok and [warning in line for line in lines if "warning" in line] == [True]
    if check is not None:
        ok = ok and check(p)
    report(label, ok, f"exit {p.returncode} | {(lines or [''])[-1]}")


def zoo_copy(work: Path, name: str, **config) -> Path:
    folder = work / f"zoo-{name}-{len(list(work.iterdir()))}"
    shutil.copytree(ZOO / name, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    return folder


def lock(folder: Path, locked: bool) -> None:
    """Make `folder` unwritable (or writable again), for root too."""
    if locked:
        folder.chmod(0o555)
    if os.geteuid() == 0:  # an immutable folder refuses chmod too: lift the attribute first when unlocking
        subprocess.run(["chattr", "+i" if locked else "-i", str(folder)], check=True)
    if not locked:
        folder.chmod(0o755)


def files_at_risk(work: Path) -> None:
    CLASS[0] = "files at risk (issue 14)"
    out = work / "results"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": 1}')
    before = (out / "summary.json").stat().st_mtime_ns
    case("positional --out into a non-empty folder", ["positional", "--model", "zoo-rope", "--out", out, *FAST],
         culprit="--out", check=lambda p: (out / "summary.json").stat().st_mtime_ns == before)

    locked = work / "locked"
    locked.mkdir()
    lock(locked, True)
    for command, option, target in [(["positional", "--model", "zoo-rope", *FAST], "--out", "o"),
                                    (["prune", "--model", "zoo-rope", "--remove", "1"], "--out", "o"),
                                    (["bi", "--model", "zoo-rope", *FAST], "--html", "b.html"),
                                    (["extend", "--model", "zoo-rope"], "--html", "e.html"),
                                    (["rope-bound", "--length", "1024"], "--html", "r.html"),
                                    (["demo", "--model", "zoo-rope"], "--out", "d")]:
        case(f"{command[0]} {option} in an unwritable folder", [*command, option, locked / target],
             culprit="cannot write in")
    lock(locked, False)

    html = work / "bi.html"
    html.write_text("my old figure")
    case("bi --html over an existing file (temp, then rename)", ["bi", "--model", "zoo-rope", "--html", html, *FAST],
         code=0, check=lambda p: "plotly" in html.read_text() and not list(work.glob(".bi.html*")))

    prune = subprocess.Popen([RESIDSCOPE, "prune", "--model", "zoo-rope", "--remove", "1", "--out", work / "pruned",
                              *FAST, "--eval-samples", "2"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not list(work.glob(".pruned.tmp-*")):
        time.sleep(0.02)
    prune.send_signal(signal.SIGKILL)  # mid-write: its temporary folder stays behind
    prune.wait()
    left = list(work.glob(".pruned.tmp-*"))
    case("a SIGKILLed prune's temp folder goes at the next write",
         ["prune", "--model", "zoo-rope", "--remove", "1", "--out", work / "pruned2", *FAST, "--eval-samples", "2"],
         code=0, check=lambda p: bool(left) and not any(t.exists() for t in left))


def silent_wrong_results(work: Path) -> None:
    from safetensors.torch import load_file, save_file

    CLASS[0] = "silent wrong results (issue 14)"
    nan_model = zoo_copy(work, "rope")
    state = load_file(nan_model / "model.safetensors")
    state["model.norm.weight"][3] = float("nan")
    save_file(state, str(nan_model / "model.safetensors"), metadata={"format": "pt"})
    ppl = ["ppl", "--model", nan_model, "--seq-len", "32", "--samples", "2"]
    case("ppl on a model with a NaN weight", ppl, check=lambda p: p.stdout == "")
    case("ppl --json on a model with a NaN weight", [*ppl, "--json"], check=lambda p: "NaN" not in p.stdout)
    for argv, culprit in [(["--model", "zoo-rope", "--method", "pi", "--factor", "inf"], "factor"),
                          (["--model", "zoo-window", "--method", "window", "--factor", "inf"], "factor"),
                          (["--model", "zoo-window", "--method", "window", "--logit-scale", "0"], "--logit-scale"),
                          (["--model", "zoo-rope", "--max-tokens", "-500"], "--max-tokens"),
                          (["--model", "zoo-rope", "--window", "0"], "--window")]:
        case("extend " + " ".join(argv[2:]), ["extend", *argv], culprit=culprit)
    case("rope-bound --grid-step inf", ["rope-bound", "--length", "1024", "--grid-step", "inf"], culprit="--grid-step")
    case("rope-bound --model with max_position_embeddings 0",
         ["rope-bound", "--model", zoo_copy(work, "rope", max_position_embeddings=0)], culprit="max_position_embeddings")
    case("ppl --seq-len 200 > 128 positions: one warning",
         ["ppl", "--model", "zoo-rope", "--seq-len", "200", "--samples", "2", "--json"], code=0, warning="seq_len=200")
    case("positional --seq-len 200: one warning",
         ["positional", "--model", "zoo-rope", "--seq-len", "200", "--samples", "2", "--batch-size", "2",
          "--remove-layers", "", "--probe-tokens", "0", "--out", work / "pos200", "--json"], code=0, warning="seq_len=200")


def tracebacks_and_messages(work: Path) -> None:
    CLASS[0] = "tracebacks and messages (issue 14)"
    latin1 = work / "latin1.txt"
    latin1.write_bytes(b"hello world caf\xe9 " * 50)
    case("non-UTF-8 --text", ["ppl", "--model", "zoo-rope", "--text", latin1, *FAST], culprit="offset 15")
    case("--text is a folder", ["ppl", "--model", "zoo-rope", "--text", work, *FAST], culprit=str(work))
    case("--device cuda on a CPU build", ["ppl", "--model", "zoo-rope", "--device", "cuda", *FAST], culprit="'cuda'")
    case("--device banana", ["ppl", "--model", "zoo-rope", "--device", "banana", *FAST], culprit="'banana'")
    case("app --model does-not-exist", ["app", "--model", "does-not-exist"], culprit="does-not-exist")


def hangs(work: Path) -> None:
    CLASS[0] = "hangs (issue 14)"
    case("rope-bound --length 1e12", ["rope-bound", "--length", 10**12], culprit="length")
    case("rope-bound --grid-step 1e-12", ["rope-bound", "--length", "1024", "--grid-step", "1e-12"], culprit="--grid-step")
    case("generate --max-new-tokens 1e12", ["generate", "hi", "--model", "zoo-rope", "--max-new-tokens", 10**12],
         culprit="--max-new-tokens")
    p = subprocess.Popen([RESIDSCOPE, "rope-bound", "--table"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    time.sleep(8)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    last = (stderr_lines(err) or [""])[-1]
    report("Ctrl-C during rope-bound --table", p.returncode == 130 and last == "residscope: interrupted"
           and "Traceback" not in err, f"exit {p.returncode} | {last}")


# ---- issue 24: one group per root cause ------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def output_safety(work: Path) -> None:
    CLASS[0] = "1. output safety"
    mine = work / "mine"
    (mine / "pruned").mkdir(parents=True)
    (mine / "summary.json").write_text('{"mine": 1}')
    (mine / "pruned" / "notes.txt").write_text("my notes")
    before = snapshot(mine)
    case("demo --out a folder holding the user's files", ["demo", "--model", "zoo-rope", "--out", mine],
         culprit="not empty", check=lambda p: snapshot(mine) == before)
    model = zoo_copy(work, "rope")
    kept = snapshot(model)
    for label, out in [("is", model), ("inside", model / "sub"), ("containing", work)]:
        case(f"prune --force --out {label} the checkpoint it reads",
             ["prune", "--model", model, "--layers", "1", "--out", out, "--force", *FAST, "--eval-samples", "2"],
             culprit="--out", check=lambda p: snapshot(model) == kept)
    case("bi --html inside the model folder", ["bi", "--model", model, "--html", model / "bi.html", *FAST],
         culprit="inside the input folder")
    text = work / "corpus.txt"
    text.write_text("some words of text " * 400)
    case("positional --out over its own --text file",
         ["positional", "--model", "zoo-rope", "--text", text, "--out", text, "--force", *FAST], culprit="--out")


def tied_checkpoints(work: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    CLASS[0] = "2. tied checkpoints"
    tied = zoo_copy(work, "rope")
    state = load_file(tied / "model.safetensors")
    torch.manual_seed(1)
    state["lm_head.weight"] = torch.randn_like(state["model.embed_tokens.weight"]) * 0.02
    save_file(state, str(tied / "model.safetensors"), metadata={"format": "pt"})
    case("tied config, lm_head.weight differs: untied like transformers, one warning",
         ["ppl", "--model", tied, "--seq-len", "32", "--samples", "2"], code=0, warning="differs from the embedding")


def lying_files(work: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    CLASS[0] = "3. checkpoint files that lie"

    def sharded() -> tuple[Path, dict]:
        folder = zoo_copy(work, "rope")
        state = load_file(folder / "model.safetensors")
        names = sorted(state)
        weight_map = {}
        for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
            file = f"model-0000{i + 1}-of-00002.safetensors"
            save_file({n: state[n] for n in part}, str(folder / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        (folder / "model.safetensors").unlink()
        return folder, weight_map

    def index(folder: Path, weight_map) -> Path:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return folder

    folder, weight_map = sharded()
    case("index weight_map is a list", ["ppl", "--model", index(folder, list(weight_map)), *FAST], culprit="weight_map")
    folder, weight_map = sharded()
    case("index weight_map holds null",
         ["ppl", "--model", index(folder, {**weight_map, next(iter(weight_map)): None}), *FAST], culprit="weight_map[")
    folder, weight_map = sharded()
    first = folder / "model-00001-of-00002.safetensors"
    state = load_file(first)
    other = next(n for n, f in weight_map.items() if f != first.name)
    state[other] = torch.zeros_like(load_file(folder / weight_map[other])[other])
    save_file(state, str(first), metadata={"format": "pt"})
    case("a tensor in two shard files", ["ppl", "--model", index(folder, weight_map), *FAST], culprit="one shard only")

    overlap = zoo_copy(work, "rope")
    raw = (overlap / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    q = "model.layers.1.self_attn.q_proj.weight"  # its range moved onto its neighbour's; the file keeps its size
    begin, (lo, hi) = header[names[names.index(q) - 1]]["data_offsets"][0], header[q]["data_offsets"]
    header[q]["data_offsets"] = [begin, begin + hi - lo]
    text_header = json.dumps(header).encode()
    text_header += b" " * (-len(text_header) % 8)
    (overlap / "model.safetensors").write_bytes(len(text_header).to_bytes(8, "little") + text_header + raw[8 + n:])
    case("safetensors header with overlapping byte ranges", ["ppl", "--model", overlap, *FAST], culprit="overlaps")
    case("quantization_config in config.json",
         ["ppl", "--model", zoo_copy(work, "rope", quantization_config={"quant_method": "gptq", "bits": 4}), *FAST],
         culprit="quantization_config")
    case("gpt-oss MXFP4 experts (quantization_config mxfp4)",
         ["ppl", "--model", zoo_copy(work, "rope", model_type="gpt_oss", quantization_config={"quant_method": "mxfp4"}),
          *FAST], culprit="MXFP4 expert weights")
    case("config vocab_size smaller than the tokenizer's",
         ["ppl", "--model", zoo_copy(work, "rope", vocab_size=1000), *FAST], culprit="vocab_size 1000")

    # GGUF files of residscope's own table (model/gguf_archs.py): a key the converter always writes, missing; a key
    # the table does not read; a tensor missing. The file: a random GPT-NeoX with the zoo's tokenizer, exported.
    good = neox_gguf(work)
    case("gptneox GGUF without use_parallel_residual",
         ["ppl", "--model", gguf_edit(good, work / "no-key.gguf", remove="gptneox.use_parallel_residual"), *FAST],
         culprit="gptneox.use_parallel_residual")
    case("gptneox GGUF with a key the mapping does not read",
         ["ppl", "--model", gguf_edit(good, work / "swa.gguf", add=("gptneox.attention.sliding_window", 16)), *FAST],
         culprit="gptneox.attention.sliding_window")
    case("gptneox GGUF without one tensor",
         ["ppl", "--model", gguf_edit(good, work / "no-tensor.gguf", drop_tensor="blk.1.ffn_up.weight"), *FAST],
         culprit="blk.1.ffn_up.weight")


def neox_gguf(work: Path) -> Path:
    """A tiny random GPT-NeoX (the zoo's tokenizer) written by `residscope.model.gguf_export` as llama.cpp's gptneox."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    from residscope.model import load_model
    from residscope.model.gguf_export import write_gguf

    folder = work / "neox"
    tokenizer = AutoTokenizer.from_pretrained(ZOO / "rope")
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                                     rotary_pct=0.25)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(write_gguf(load_model(folder), work / "neox.gguf").path)


def gguf_edit(source: Path, target: Path, *, remove: str | None = None, add: tuple | None = None,
              drop_tensor: str | None = None) -> Path:
    """`source` rewritten by the gguf package's writer without one key or tensor, or with one more uint32 key."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), reader.fields["general.architecture"].contents())
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", remove):
            continue
        value_type = f.types[0]
        sub_type = f.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), value_type, sub_type=sub_type)
    if add is not None:
        writer.add_uint32(*add)
    for t in reader.tensors:
        if t.name != drop_tensor:
            writer.add_tensor(t.name, t.data, raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def tokenizer_failures(work: Path) -> None:
    CLASS[0] = "4. config and tokenizer failures"
    case("linear rope_scaling without factor",
         ["ppl", "--model", zoo_copy(work, "rope", rope_scaling={"rope_type": "linear"}), *FAST], culprit="'factor'")
    case("string eos_token_id", ["ppl", "--model", zoo_copy(work, "rope", eos_token_id="2"), *FAST],
         culprit="eos_token_id")
    truncated = zoo_copy(work, "rope")
    (truncated / "tokenizer.json").write_text((truncated / "tokenizer.json").read_text()[:3000])
    case("truncated tokenizer.json", ["ppl", "--model", truncated, *FAST], culprit="tokenizer.json: not valid JSON")


OFFLOAD_SCRIPT = """
import sys, torch
from safetensors.torch import load_file, save_file
from residscope.model import load_model
folder = sys.argv[1]
model = load_model(folder, offload=True)
state = load_file(folder + "/model.safetensors")
def resave(x, hook):
    save_file(dict(reversed(list(state.items()))), folder + "/model.safetensors", metadata={"format": "pt"})
    return x
model.run_with_hooks(torch.tensor([[1, 2, 3]]), fwd_hooks=[("blocks.1.hook_resid_pre", resave)])
"""


def offload_identity(work: Path) -> None:
    CLASS[0] = "5. offload file identity"
    folder = zoo_copy(work, "rope")
    p = subprocess.run([sys.executable, "-c", OFFLOAD_SCRIPT, str(folder)], capture_output=True, text=True, env=ENV,
                       timeout=600)
    last = (stderr_lines(p.stderr) or [""])[-1]
    report("offloaded model, file re-saved from a hook mid-forward", p.returncode == 1 and "CheckpointError" in last
           and "changed since the model was loaded" in last, f"exit {p.returncode} | {last}")


def nproc_paths(work: Path) -> None:
    from residscope.apps.workers import free_port

    CLASS[0] = "6. --nproc error paths"
    two = ["--nproc", "2", "--seq-len", "16", "--samples", "4", "--batch-size", "1"]
    case("ppl --nproc 2 --text missing.txt: the worker's one line",
         ["ppl", "--model", "zoo-rope", *two, "--text", work / "missing.txt"], culprit="missing.txt")
    case("bi --nproc 2 --seq-len 1", ["bi", "--model", "zoo-rope", *two, "--seq-len", "1"], culprit="--seq-len")
    case("stray WORLD_SIZE in the environment", ["ppl", "--model", "zoo-rope", *FAST], culprit="WORLD_SIZE=2",
         env={"WORLD_SIZE": "2"})
    t0 = time.time()
    case("stray WORLD_SIZE/RANK/MASTER_ADDR, no peer: short timeout", ["ppl", "--model", "zoo-rope", *two[2:]],
         culprit="could not join", env={"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                        "MASTER_PORT": str(free_port()), "RESIDSCOPE_JOIN_TIMEOUT": "10"},
         check=lambda p: time.time() - t0 < 120)
    interrupt("Ctrl-C during ppl --nproc 2", ["ppl", "--model", "zoo-rope", "--nproc", "2", "--seq-len", "128",
                                              "--samples", "64", "--batch-size", "1"], after=40)


def limits(work: Path) -> None:
    CLASS[0] = "7. limits and argument checks"
    case("passkey --lengths 1000000", ["passkey", "--model", "zoo-rope", "--lengths", "1000000"], culprit="limit of 32768")
    case("ppl --samples 0", ["ppl", "--model", "zoo-rope", "--samples", "0"], culprit="--samples")
    case("positional --probe-tokens -5", ["positional", "--model", "zoo-rope", "--probe-tokens", "-5", "--out", work / "p"],
         culprit="--probe-tokens")
    blank = work / "blank.txt"
    blank.write_text(" \n\t " * 500)
    case("whitespace-only --text", ["ppl", "--model", "zoo-rope", "--text", blank, *FAST], culprit="no text")
    case("prune --layers ''", ["prune", "--model", "zoo-rope", "--layers", "", "--out", work / "pl"], culprit="--layers")
    interrupt("Ctrl-C during passkey --lengths 32768", ["passkey", "--model", "zoo-rope", "--lengths", "32768", "--keys",
                                                        "1", "--depths", "0.5"], after=40)


def absent(*paths: Path):
    """A check: none of `paths` was written."""
    return lambda p: not any(path.exists() for path in paths)


def new_commands(work: Path) -> None:
    CLASS[0] = "8. commands of the third wave"
    moe = ZOO / "moe"
    out = work / "nc-out"
    report_json = work / "nc-report.json"
    for label, argv, culprit in [
        ("evaluate --tasks with an unknown task", ["evaluate", "--model", "zoo-rope", "--tasks", "addition,bogus",
                                                    "--out", report_json], "--tasks"),
        ("evaluate --cut without --baseline", ["evaluate", "--model", "zoo-rope", "--cut", "--out", report_json],
         "--baseline"),
        ("evaluate --n 0", ["evaluate", "--model", "zoo-rope", "--n", "0", "--out", report_json], "--n"),
        ("heal --steps 0", ["heal", "--model", "zoo-rope", "--steps", "0", "--out", out], "--steps"),
        ("heal --method bogus", ["heal", "--model", "zoo-rope", "--method", "bogus", "--out", out], "--method"),
        ("heal --method streamline without --remove", ["heal", "--model", "zoo-rope", "--method", "streamline",
                                                       "--out", out], "--remove"),
        ("heal --method streamline --remove >= depth", ["heal", "--model", "zoo-rope", "--method", "streamline",
                                                        "--remove", "99", "--out", out], "--remove"),
        ("experts on a dense model", ["experts", "--model", "zoo-rope", *FAST], "--model"),
        ("experts --position-buckets 0", ["experts", "--model", moe, "--position-buckets", "0", *FAST],
         "--position-buckets"),
        ("prune-experts --keep 99", ["prune-experts", "--model", moe, "--keep", "99", "--out", out, *FAST], "--keep"),
        ("prune-experts --criterion nope", ["prune-experts", "--model", moe, "--keep", "4", "--criterion", "nope",
                                            "--out", out, *FAST], "--criterion"),
        ("prune-experts on a dense model", ["prune-experts", "--model", "zoo-rope", "--keep", "2", "--out", out, *FAST],
         "--model"),
        ("ruler --tasks with an unknown task", ["ruler", "--model", "zoo-rope", "--tasks", "niah_single_1,bogus",
                                                 "--out", report_json], "--tasks"),
        ("ruler --depths 0.5,2", ["ruler", "--model", "zoo-rope", "--depths", "0.5,2", "--out", report_json],
         "--depths"),
        ("long-context --text builtin:nope", ["long-context", "--model", "zoo-rope", "--seq-len", "300", "--text",
                                              "builtin:nope", "--html", work / "lc.html"], "--text"),
        ("long-context --first-k >= --seq-len", ["long-context", "--model", "zoo-rope", "--seq-len", "300",
                                                 "--first-k", "300", "--html", work / "lc.html"], "--first-k"),
        ("export --gguf --quant nope", ["export", "--model", "zoo-rope", "--gguf", work / "x.gguf", "--quant", "nope"],
         "--quant"),
    ]:
        case(label, argv, culprit=culprit, check=absent(out, report_json, work / "lc.html", work / "x.gguf"))
    existing = work / "mine.gguf"
    existing.write_bytes(b"my file")
    case("export --gguf over an existing file without --force",
         ["export", "--model", "zoo-rope", "--gguf", existing], culprit="--force",
         check=lambda p: existing.read_bytes() == b"my file")


def gpt2_checkpoint(work: Path, **config) -> Path:
    """A tiny random GPT-2 saved by transformers, with `config` keys set in its config.json."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = work / f"gpt2-{len(list(work.iterdir()))}"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                eos_token_id=0)).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    return folder


def family_refusals(work: Path) -> None:
    from safetensors.torch import load_file, save_file

    CLASS[0] = "9. refused config keys and tensors of the new families"
    case("gpt2 scale_attn_by_inverse_layer_idx: true",
         ["ppl", "--model", gpt2_checkpoint(work, scale_attn_by_inverse_layer_idx=True), *FAST],
         culprit="scale_attn_by_inverse_layer_idx")
    case("gpt2 add_cross_attention: true", ["ppl", "--model", gpt2_checkpoint(work, add_cross_attention=True), *FAST],
         culprit="add_cross_attention")
    case("gpt2 n_layer and num_hidden_layers disagree",
         ["ppl", "--model", gpt2_checkpoint(work, num_hidden_layers=5), *FAST], culprit="num_hidden_layers=5")
    case("unknown model_type", ["ppl", "--model", zoo_copy(work, "rope", model_type="mamba"), *FAST],
         culprit="model_type 'mamba'")
    missing = zoo_copy(work, "moe")
    state = load_file(missing / "model.safetensors")
    expert = next(k for k in sorted(state) if ".experts.3." in k)
    del state[expert]
    save_file(state, str(missing / "model.safetensors"), metadata={"format": "pt"})
    case("qwen2_moe checkpoint missing an expert tensor", ["ppl", "--model", missing, *FAST], culprit="missing tensor")


def interrupt(label: str, argv: list, *, after: float) -> None:
    """SIGINT to the whole process group after `after` seconds, as a terminal's Ctrl-C does; clean when the command
    says "interrupted" and exits with 130 within a minute, without a traceback."""
    p = subprocess.Popen([RESIDSCOPE, *map(str, argv)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    time.sleep(after)
    t0 = time.time()
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=300)
    last = (stderr_lines(err) or [""])[-1]
    report(label, p.returncode == 130 and last == "residscope: interrupted" and "Traceback" not in err
           and time.time() - t0 < 60, f"exit {p.returncode} after {time.time() - t0:.0f} s | {last}")


def table() -> str:
    """Clean cases per class, as the README shows it."""
    classes = list(dict.fromkeys(c for c, _, _ in results))
    rows = ["| class | clean | tried |", "|---|---|---|"]
    for c in classes:
        mine = [ok for k, _, ok in results if k == c]
        rows.append(f"| {c} | {sum(mine)} | {len(mine)} |")
    return "\n".join(rows)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="residscope-sweep-"))
    groups = [files_at_risk, silent_wrong_results, tracebacks_and_messages, hangs, output_safety,
              tied_checkpoints, lying_files, tokenizer_failures, offload_identity, nproc_paths, limits, new_commands,
              family_refusals]
    only = sys.argv[1:]  # e.g. `python benchmarks/bad_input_sweep.py output_safety limits`: some groups only
    try:
        for group in groups:
            if not only or group.__name__ in only:
                group(work)
    finally:
        if (work / "locked").exists():
            lock(work / "locked", False)
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + table())
    print(f"\n{sum(ok for _, _, ok in results)} clean of {len(results)} tried")


if __name__ == "__main__":
    main()
