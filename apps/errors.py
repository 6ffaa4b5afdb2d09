"""Turn user mistakes into one-line messages for the CLI; leave bugs their traceback.

    residscope.model.errors.InputError (and subclasses)  -> "residscope: error: <first line>", exit code 2
    click/typer usage errors (unknown option, bad value) -> "residscope: error: <click's message>", exit code 2
    Ctrl-C (KeyboardInterrupt)                           -> "residscope: interrupted", exit code 130
    anything else                                        -> re-raised: Python prints the traceback, exit code 1

Warnings from the library (e.g. a sequence longer than the model's max positions) print as one line each.
"""

from __future__ import annotations

import logging
import sys
import warnings

import typer


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def one_line(error: BaseException) -> str:
    """An error for display: bad input as its own message, anything else prefixed with its type."""
    from residscope.model.errors import InputError

    text = first_line(error)
    return text if isinstance(error, InputError) else f"{type(error).__name__}: {text}"


def log_failure(log: logging.Logger, error: BaseException, what: str) -> None:
    """For servers (the explorer), which show the error on the page: bad input is the user's to fix, one line in the
    log; anything else is a bug, logged with its traceback. Call from inside the `except` block."""
    from residscope.model.errors import InputError

    if isinstance(error, InputError):
        log.warning("%s: %s", what, first_line(error))
    else:
        log.exception(what)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"residscope: warning: {first_line(message) if isinstance(message, Warning) else message}",
          file=file or sys.stderr)


def run_cli(app: typer.Typer, argv: list[str]) -> None:
    from residscope.model.errors import InputError

    show = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        # without standalone mode click returns the code of `typer.Exit(n)` instead of exiting with it
        code = app(args=argv, standalone_mode=False)  # typer returns 130 for Ctrl-C inside a command
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _interrupted()
    except InputError as e:
        print(f"residscope: error: {first_line(e)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - classify below
        # typer vendors click: its usage errors (bad option, bad value) derive from typer.TyperException
        if isinstance(e, typer.TyperException) and hasattr(e, "format_message"):
            print(f"residscope: error: {first_line(Exception(e.format_message()))}", file=sys.stderr)
            sys.exit(getattr(e, "exit_code", 2))
        raise
    finally:
        warnings.showwarning = show
    if code == 130:
        _interrupted()
    if isinstance(code, int) and code != 0:
        sys.exit(code)


def _interrupted() -> None:
    # every file residscope writes goes to a temporary name first, so an interrupted run leaves nothing half-written
    print("residscope: interrupted", file=sys.stderr)
    sys.exit(130)
