"""The CLI's error contract: exit codes pass through, bad input is one line on stderr with exit code 2."""

from __future__ import annotations

import pytest
import typer

from residscope.apps.errors import run_cli


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def fail(code: int, kind: str = "exit") -> None:
        if kind == "exit":
            raise typer.Exit(code)
        if kind == "value":
            raise ValueError("--layers: layer 40 out of range (model has 30 layers)\nsecond line")
        if kind == "key":
            raise KeyError("model.norm.weight")
        raise RuntimeError("a bug")

    @app.command()
    def ok() -> None:
        pass

    return app


@pytest.mark.parametrize("code", [0, 3])
def test_exit_codes_pass_through(code):
    with pytest.raises(SystemExit) as e:
        run_cli(_app(), ["fail", str(code)])
    assert e.value.code == code


def test_success_exits_zero():
    with pytest.raises(SystemExit) as e:
        run_cli(_app(), ["ok"])
    assert e.value.code == 0


@pytest.mark.parametrize("kind, message", [("value", "--layers: layer 40 out of range (model has 30 layers)"),
                                           ("key", "model.norm.weight")])
def test_user_errors_are_one_line(kind, message, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(_app(), ["fail", "0", "--kind", kind])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"residscope: error: {message}\n"


def test_bugs_keep_their_traceback():
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(_app(), ["fail", "0", "--kind", "bug"])


def test_usage_errors_from_click(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(_app(), ["fail", "not-a-number"])
    assert e.value.code == 2
    assert "Invalid value for 'code'" in capsys.readouterr().err  # names the argument
