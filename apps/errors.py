"""Turn the library's input errors into one-line messages for the CLI (no tracebacks for bad input)."""

from __future__ import annotations

import sys

import typer


def user_error_types() -> tuple[type[BaseException], ...]:
    # FileNotFoundError / ValueError subclasses carry messages that already name the file, key or argument.
    from residscope.model.config import ConfigError
    from residscope.model.errors import CheckpointError

    return (ConfigError, CheckpointError, FileNotFoundError, ValueError, KeyError)


def run_cli(app: typer.Typer, argv: list[str]) -> None:
    try:
        # without standalone mode click returns the code of `typer.Exit(n)` instead of exiting with it
        code = app(args=argv, standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("residscope: aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - classify below
        # typer vendors click: its usage errors (bad option, bad value) derive from typer.TyperException
        if isinstance(e, typer.TyperException) and hasattr(e, "show"):
            e.show()
            sys.exit(getattr(e, "exit_code", 2))
        if isinstance(e, user_error_types()):
            text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)  # str(KeyError) adds quotes
            msg = text.strip().splitlines()[0] if text.strip() else type(e).__name__
            print(f"residscope: error: {msg}", file=sys.stderr)
            sys.exit(2)
        raise
    if isinstance(code, int) and code != 0:
        sys.exit(code)
