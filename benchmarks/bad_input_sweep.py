"""Bad-input sweep (issue 14, CLI side): the real `residscope` console script, one subprocess per case, on the zoo models.

    python benchmarks/bad_input_sweep.py          # prints CLEAN/FAIL per case and "N clean of M tried"

A case is clean when the exit code is the promised one (2 for bad input, with exactly one `residscope: error:` line on
stderr naming the culprit; 0 with exactly one warning line for a legitimate but unusual run; 130 after Ctrl-C) and the
user's files are untouched. Unlike tests/test_bad_inputs.py (in process, monkeypatched where needed), this runs the
installed command end to end, SIGKILLs a real prune and interrupts a real rope-bound. Unwritable folders use
`chattr +i` when run as root (root ignores permission bits). ~15 minutes on a busy 2-core machine, mostly start-up.
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
results: list[tuple[str, bool]] = []


def stderr_lines(stderr: str) -> list[str]:
    """stderr without tqdm's progress-bar redraws."""
    return [line for line in stderr.splitlines() if line.strip() and "\r" not in line and "it/s" not in line
            and "s/it" not in line]


def report(label: str, ok: bool, detail: str) -> None:
    results.append((label, ok))
    print(f"{'CLEAN' if ok else 'FAIL '} {label:<52} | {detail[:150]}", flush=True)


def case(label: str, argv: list, *, code: int = 2, culprit: str | None = None, warning: str | None = None,
         check=None) -> None:
    """Run `residscope argv`; clean when the exit code is `code` and stderr is what the contract promises."""
    p = subprocess.run([RESIDSCOPE, *map(str, argv)], capture_output=True, text=True, env=ENV, timeout=900)
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

    nan_model = zoo_copy(work, "rope")
    state = load_file(nan_model / "model.safetensors")
    state["model.norm.weight"][3] = float("nan")
    save_file(state, str(nan_model / "model.safetensors"), metadata={"format": "pt"})
    ppl = ["ppl", "--model", nan_model, "--seq-len", "32", "--samples", "2"]
    case("ppl on a model with a NaN weight", ppl, check=lambda p: p.stdout == "")
    case("ppl --json on a model with a NaN weight", [*ppl, "--json"], check=lambda p: "NaN" not in p.stdout)
    for argv, culprit in [(["--model", "zoo-rope", "--method", "pi", "--factor", "inf"], "factor"),
                          (["--model", "zoo-window", "--method", "window", "--factor", "inf"], "factor"),
                          (["--model", "zoo-window", "--method", "window", "--logit-scale", "0"], "logit_scale"),
                          (["--model", "zoo-rope", "--max-tokens", "-500"], "max_tokens"),
                          (["--model", "zoo-rope", "--window", "0"], "window must be")]:
        case("extend " + " ".join(argv[2:]), ["extend", *argv], culprit=culprit)
    case("rope-bound --grid-step inf", ["rope-bound", "--length", "1024", "--grid-step", "inf"], culprit="grid_step")
    case("rope-bound --model with max_position_embeddings 0",
         ["rope-bound", "--model", zoo_copy(work, "rope", max_position_embeddings=0)], culprit="max_position_embeddings")
    case("ppl --seq-len 200 > 128 positions: one warning",
         ["ppl", "--model", "zoo-rope", "--seq-len", "200", "--samples", "2", "--json"], code=0, warning="seq_len=200")
    case("positional --seq-len 200: one warning",
         ["positional", "--model", "zoo-rope", "--seq-len", "200", "--samples", "2", "--batch-size", "2",
          "--remove-layers", "", "--probe-tokens", "0", "--out", work / "pos200", "--json"], code=0, warning="seq_len=200")


def tracebacks_and_messages(work: Path) -> None:
    latin1 = work / "latin1.txt"
    latin1.write_bytes(b"hello world caf\xe9 " * 50)
    case("non-UTF-8 --text", ["ppl", "--model", "zoo-rope", "--text", latin1, *FAST], culprit="offset 15")
    case("--text is a folder", ["ppl", "--model", "zoo-rope", "--text", work, *FAST], culprit=str(work))
    case("--device cuda on a CPU build", ["ppl", "--model", "zoo-rope", "--device", "cuda", *FAST], culprit="'cuda'")
    case("--device banana", ["ppl", "--model", "zoo-rope", "--device", "banana", *FAST], culprit="'banana'")
    case("app --model does-not-exist", ["app", "--model", "does-not-exist"], culprit="does-not-exist")


def hangs() -> None:
    case("rope-bound --length 1e12", ["rope-bound", "--length", 10**12], culprit="length")
    case("rope-bound --grid-step 1e-12", ["rope-bound", "--length", "1024", "--grid-step", "1e-12"], culprit="grid_step")
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


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="residscope-sweep-"))
    try:
        files_at_risk(work)
        silent_wrong_results(work)
        tracebacks_and_messages(work)
        hangs()
    finally:
        if (work / "locked").exists():
            lock(work / "locked", False)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{sum(ok for _, ok in results)} clean of {len(results)} tried")


if __name__ == "__main__":
    main()
