"""What the CLI commands share: their common options, loading the model they name, comma-separated lists, and
writing a figure without leaving half a file.

Light on purpose: every command module imports it at start-up, so torch and the library load only inside commands.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TypeVar, Union, get_args, get_origin, get_type_hints

import typer

from residscope.model.errors import InputError

T = TypeVar("T")

# --model defaults to None, read as the registry's default model: importing the registry here would load torch at start-up
MODEL = typer.Option(None, "--model", help="alias, Hugging Face folder or .gguf file (default: the registry's default "
                                           "model, marked * by `residscope models`)")
DTYPE = typer.Option("float32", "--dtype", help="float32, bfloat16, float16 or float64")
DEVICE = typer.Option("cpu", "--device")
SEQ_LEN = typer.Option(256, "--seq-len", help="tokens per sequence")
BATCH = typer.Option(4, "--batch-size")
SEED = typer.Option(0, "--seed", help="seed of the chunk order")
TEXT = typer.Option(None, "--text", help=".txt or .jsonl text file instead of the built-in corpus")
DATASET = typer.Option(None, "--dataset", help="a `datasets` dataset name (needs the network and residscope[online])")
JSON = typer.Option(False, "--json", help="print JSON instead of a table")
HTML = typer.Option(None, "--html", help="also write the plotly figure to this HTML file")
NPROC = typer.Option(1, "--nproc", help="local data-parallel workers (torch.distributed); or start the command under torchrun")
OFFLOAD = typer.Option(False, "--offload", help="keep the blocks on disk and stream them one at a time (models larger "
                                                 "than memory; safetensors only)")


def samples_option(default: int = 32, help: str = "calibration sequences"):
    """--samples (range in RANGES): how many sequences a command reads; commands differ in default and in what for."""
    return typer.Option(default, "--samples", help=help)


def eval_samples_option(default: int = 32, help: str = "held-out evaluation sequences"):
    """--eval-samples (range in RANGES): the held-out sequences a command scores after its calibration ones."""
    return typer.Option(default, "--eval-samples", help=help)


SAMPLES = samples_option()
EVAL_SAMPLES = eval_samples_option()
OUT_CHECKPOINT = typer.Option(None, "--out", help="folder for the pruned checkpoint")
FORCE = typer.Option(False, "--force", help="replace a non-empty --out folder")


def calibration_and_heldout(m, *, seq_len: int, samples: int, eval_samples: int, batch_size: int, seed: int,
                            text: Optional[Path], dataset: Optional[str]) -> tuple[tuple[list, str], tuple[list, str]]:
    """((batches, source), (held-out batches, source)): --samples sequences of the calibration text (--text /
    --dataset, else the built-in calibration split) and --eval-samples of the built-in evaluation split, as the
    commands that fit on one and score on the other (prune-experts, heal) read them."""
    from residscope.analyses.corpus import calibration_batches

    calib = calibration_batches(m, seq_len=seq_len, samples=samples, batch_size=batch_size, seed=seed, text_file=text,
                                dataset=dataset)
    evals = calibration_batches(m, seq_len=seq_len, samples=eval_samples, batch_size=batch_size, seed=seed,
                                split="evaluation")
    return calib, evals


# ---- the declared range of every numeric option ---------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric option: low..high (None: unbounded), each end closed unless `*_open`; floats must
    be finite. `why` is said when the high end is a limit on the work (a run that would take hours)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def describe(self, integer: bool) -> str:
        kind, low, high = "an integer" if integer else "a finite number", _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {high}"
        return kind

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def check(self, option: str, value, integer: bool):
        """`value` itself, or InputError naming the option, the range and the value (None: the option was left out)."""
        if value is not None and not self.contains(value):
            raise InputError(f"{option} must be {self.describe(integer)}{self.why}, got {value}")
        return value


def _number(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


MAX_LENGTH = 1 << 15  # passkey / extend --lengths: one forward over 32768 tokens is minutes on a CPU, beyond is hours
# Every int / float option of every command, by option name ("command --option" overrides it for one command).
# `apply_ranges` attaches these checks to the commands when the CLI is built; tests/test_bad_inputs.py fails for a
# numeric option missing here, so a new option cannot skip its range.
RANGES: dict[str, Range] = {
    "--seq-len": Range(2, 1 << 17, why=" (longer sequences take hours on a CPU)"),
    "rope-bound --seq-len": Range(1, 1 << 28),
    "--samples": Range(1, 1 << 20),
    "--eval-samples": Range(1, 1 << 20),
    "--batch-size": Range(1, 4096),
    "--seed": Range(0, 2**32 - 1),
    "--nproc": Range(1, 1024),
    "--keys": Range(1, 1000),
    "--seeds": Range(1, 1000),
    "--remove": Range(1),
    "--first-k": Range(1),
    "--cos-threshold": Range(0, 1, low_open=True),
    "--probe-tokens": Range(0, 1 << 24),
    "--max-tokens": Range(0),
    "--stride": Range(1),
    "--window": Range(1),
    "--factor": Range(1, 1e6),
    "--ratio": Range(0, low_open=True),
    "--alpha": Range(),  # any finite scale (negative flips the vectors)
    "--layer": Range(0),
    "--logit-scale": Range(0, low_open=True),
    "--remove-fraction": Range(0, 1, low_open=True, high_open=True),
    "--port": Range(1, 65535),
    "--max-new-tokens": Range(1, 4096, why=" (one forward per token: longer runs take long enough to look like a hang)"),
    "--temperature": Range(0),
    "--top-k": Range(1),
    "--top-p": Range(0, 1, low_open=True),
    "--head-dim": Range(2, 1 << 16),
    "--length": Range(1, 1 << 22, why=" (the exhaustive search grows with the length)"),
    "--base": Range(1, low_open=True),
    "--grid-step": Range(1e-5, 1),
    "--max-m": Range(1, 1 << 28),
    "evaluate --n": Range(1, 1 << 20),
    "evaluate --limit": Range(1),
    "experts --position-buckets": Range(1, 1 << 20),
    "prune-experts --keep": Range(1),
    "heal --last-k": Range(0),
    "heal --lora-rank": Range(1, 1 << 16),
    "heal --lora-alpha": Range(0, low_open=True),
    "heal --steps": Range(1, 1 << 24),
    "heal --grad-accum": Range(1, 1 << 16),
    "heal --lr": Range(0, 1, low_open=True),
    "heal --weight-decay": Range(0),
    "heal --eval-every": Range(1),
    "long-context --rows": Range(1, 1 << 20),
}


def _numeric_type(annotation) -> type | None:
    """int or float for `int`, `float`, `Optional[int]`, ...; None for anything else (bool is not numeric here)."""
    if get_origin(annotation) is Union:
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    return annotation if annotation in (int, float) else None


def numeric_options(command: Callable) -> list[tuple[str, type, typer.models.OptionInfo]]:
    """(option name, int or float, its OptionInfo) of every numeric option of a command function."""
    out, hints = [], get_type_hints(command)
    for name, param in inspect.signature(command).parameters.items():
        info, kind = param.default, _numeric_type(hints.get(name))
        if kind is None or not isinstance(info, typer.models.OptionInfo):
            continue
        decls = [d for d in (info.param_decls or ()) if d.startswith("--")] or [f"--{name.replace('_', '-')}"]
        if isinstance(info.default, str) or decls[0] in ("--help",):
            continue
        out.append((decls[0], kind, info))
    return out


def range_of(command_name: str, option: str) -> Range | None:
    return RANGES.get(f"{command_name} {option}", RANGES.get(option))


def apply_ranges(app: typer.Typer) -> None:
    """Attach the declared range check to every numeric option of every registered command (click runs it while
    parsing, before the command starts). Options sharing one OptionInfo across commands get the same check."""
    for registered in app.registered_commands:
        command_name = registered.name or registered.callback.__name__.replace("_", "-")
        for option, kind, info in numeric_options(registered.callback):
            declared = range_of(command_name, option)
            if declared is None:
                continue  # tests/test_bad_inputs.py::test_every_numeric_option_has_a_declared_range catches it
            info.callback = _range_callback(option, declared, kind is int)


def _range_callback(option: str, declared: Range, integer: bool) -> Callable:
    def check(value):
        return declared.check(option, value, integer)

    return check


def model_name(model: Optional[str]) -> str:
    """The model a command runs on: the one named, else the registry's default."""
    from residscope.model.registry import DEFAULT_MODEL

    return model if model is not None else DEFAULT_MODEL


ALLOW_NONFINITE_ENV = "RESIDSCOPE_ALLOW_NONFINITE"  # set by `residscope --allow-nonfinite <command>`


def inputs_of(model: Optional[str], *files) -> list:
    """What a command reads from disk: the model's folder or file (an alias's files too) and the given files (None
    skipped). Every output check gets these (`check_output_dir(..., inputs=...)`): no output may be, contain or lie
    inside an input."""
    from residscope.model.registry import source_paths

    return [*source_paths(model_name(model)), *(f for f in files if f is not None)]


def load(model: Optional[str], device: str = "cpu", dtype: str = "float32", offload: bool = False):
    import os

    from residscope.model import load_model

    return load_model(model_name(model), device=device, dtype=dtype, offload=offload,
                      allow_nonfinite=os.environ.get(ALLOW_NONFINITE_ENV) == "1")


def n_batches(samples: int, batch_size: int) -> int:
    """Batches of `samples` sequences (1 for values the commands refuse later with their own message)."""
    return -(-samples // batch_size) if samples > 0 and batch_size > 0 else 1


def echo_err(msg: str) -> None:
    typer.echo(msg, err=True)


def parse_list(spec: str, option: str, convert: Callable[[str], T], expected: str) -> list[T]:
    """Comma-separated values (spaces ignored, empty items skipped); a bad item names the option and what it expects,
    e.g. expected="integers like 128,256"."""
    try:
        return [convert(x) for x in spec.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise InputError(f"{option}: expected comma-separated {expected}; got {spec!r}") from None


def parse_indices(spec: str, option: str, n: int, *, what: str = "layer", note: str = "") -> list[int]:
    """Comma-separated indices in 0..n-1 (an empty spec gives an empty list)."""
    values = parse_list(spec, option, int, f"{what} indices like 1,4,15")
    for v in values:
        if not 0 <= v < n:
            raise InputError(f"{option}: {what} {v} out of range 0..{n - 1}{note}")
    return values


def parse_lengths(spec: str, option: str, high: int = MAX_LENGTH) -> list[int]:
    """Comma-separated token lengths, each in 2..`high` (MAX_LENGTH: a documented limit on the work), at least one."""
    values = parse_list(spec, option, int, "integers like 128,256,512")
    if not values or min(values) < 2:
        raise InputError(f"{option}: lengths must be integers >= 2, got {spec!r}")
    if max(values) > high:
        raise InputError(f"{option}: length {max(values)} is over the limit of {high} tokens (attention over longer "
                         "prompts takes hours on a CPU)")
    return values


def parse_fractions(spec: str, option: str) -> list[float]:
    """Comma-separated numbers in [0, 1], at least one."""
    values = parse_list(spec, option, float, "numbers like 0,0.5,1")
    if not values or not all(0 <= v <= 1 for v in values):
        raise InputError(f"{option}: values must be in [0, 1], got {spec!r}")
    return values


def write_figure(fig, path: Path, *, inline_js: bool = False) -> Path:
    """A plotly figure as an HTML file, written to a temp name and renamed (plotly.js from its CDN unless `inline_js`)."""
    from residscope.common.atomic import atomic_write

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: fig.write_html(str(tmp), include_plotlyjs=True if inline_js else "cdn"))
