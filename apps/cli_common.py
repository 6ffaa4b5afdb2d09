"""What the CLI commands share: their common options, loading the model they name, comma-separated lists, and
writing a figure without leaving half a file.

Light on purpose: every command module imports it at start-up, so torch and the library load only inside commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, TypeVar

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


def parse_lengths(spec: str, option: str) -> list[int]:
    """Comma-separated token lengths, each >= 2, at least one."""
    values = parse_list(spec, option, int, "integers like 128,256,512")
    if not values or min(values) < 2:
        raise InputError(f"{option}: lengths must be integers >= 2, got {spec!r}")
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
