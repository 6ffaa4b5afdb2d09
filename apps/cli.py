"""The `residscope` command line. Each feature registers its commands from its own module (`register(app)`),
so heavy imports (torch, transformers) happen inside the commands, not at start-up."""

from __future__ import annotations

import os
import sys

import typer

from .cli_common import ALLOW_NONFINITE_ENV, apply_ranges

app = typer.Typer(
    name="residscope",
    help="Look inside decoder-only LLMs and cut them: hooks, positional analyses, ShortGPT pruning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# One module per feature; each defines register(app).
from . import (cli_app, cli_demo, cli_evaluate, cli_experts, cli_extend, cli_heal, cli_models,  # noqa: E402
               cli_positional, cli_rope, cli_ruler, cli_surgery)

for _module in (cli_app, cli_demo, cli_evaluate, cli_experts, cli_extend, cli_heal, cli_models, cli_positional, cli_ruler,
                cli_surgery, cli_rope):
    _module.register(app)
apply_ranges(app)  # every numeric option checked against its declared range (cli_common.RANGES)


@app.callback()
def _global_options(
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="load weights holding NaN or Inf instead of "
                                         "refusing them (to inspect a broken checkpoint); put it before the command"),
) -> None:
    # an environment variable rather than module state, so --nproc workers (new processes) inherit it; always
    # written, so an earlier in-process run's flag does not carry over
    os.environ[ALLOW_NONFINITE_ENV] = "1" if allow_nonfinite else "0"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    from .errors import run_cli

    run_cli(app, argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
