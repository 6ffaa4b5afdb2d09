"""The CLI's error contract: exit codes pass through, bad input is one line on stderr with exit code 2."""

from __future__ import annotations

import pytest
import typer

from residscope.apps.errors import run_cli
from residscope.model.config import ConfigError
from residscope.model.errors import InputError, MissingFileError


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def fail(code: int, kind: str = "exit") -> None:
        if kind == "exit":
            raise typer.Exit(code)
        if kind == "input":
            raise InputError("--layers: layer 40 out of range (model has 30 layers)\nsecond line")
        if kind == "config":
            raise ConfigError("config.json: num_hidden_layers must be a positive integer, got -2")
        if kind == "missing":
            raise MissingFileError("notes.txt: no such text file")
        if kind == "interrupt":
            raise KeyboardInterrupt
        if kind == "value":
            raise ValueError("an internal ValueError")
        if kind == "key":
            raise KeyError("model.norm.weight")
        raise RuntimeError("a bug")

    @app.command()
    def ok() -> None:
        pass

    return app


def test_nonzero_exit_codes_pass_through():
    with pytest.raises(SystemExit) as e:
        run_cli(_app(), ["fail", "3"])
    assert e.value.code == 3


@pytest.mark.parametrize("argv", [["ok"], ["fail", "0"]])
def test_success_returns_normally(argv):
    """In-process callers (tests, notebooks) get control back; the console script then exits 0."""
    assert run_cli(_app(), argv) is None


@pytest.mark.parametrize("kind, message", [("input", "--layers: layer 40 out of range (model has 30 layers)"),
                                           ("config", "config.json: num_hidden_layers must be a positive integer, got -2"),
                                           ("missing", "notes.txt: no such text file")])
def test_user_errors_are_one_line(kind, message, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(_app(), ["fail", "0", "--kind", kind])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"residscope: error: {message}\n"


@pytest.mark.parametrize("kind, error", [("bug", RuntimeError), ("value", ValueError), ("key", KeyError)])
def test_bugs_keep_their_traceback(kind, error):
    """Only residscope's InputError means bad input: a bare ValueError / KeyError from deep inside is a bug."""
    with pytest.raises(error):
        run_cli(_app(), ["fail", "0", "--kind", kind])


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(_app(), ["fail", "0", "--kind", "interrupt"])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "residscope: interrupted"


def test_usage_errors_from_click(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(_app(), ["fail", "not-a-number"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Invalid value for 'code'" in err and len(err.strip().splitlines()) == 1  # names the argument, one line


def test_list_options_are_parsed_in_one_place():
    from residscope.apps.cli_common import parse_fractions, parse_indices, parse_lengths

    assert parse_lengths(" 128, 256,", "--lengths") == [128, 256]
    assert parse_fractions("0,0.5,1", "--depths") == [0.0, 0.5, 1.0]
    assert parse_indices("", "--remove-layers", 5) == []
    for call, message in [
        (lambda: parse_lengths("128,x", "--lengths"), "--lengths: expected comma-separated integers like 128,256,512; got '128,x'"),
        (lambda: parse_lengths("1", "--lengths"), "--lengths: lengths must be integers >= 2, got '1'"),
        (lambda: parse_fractions("0.5,2", "--depths"), "--depths: values must be in [0, 1], got '0.5,2'"),
        (lambda: parse_indices("1,7", "--remove-layers", 5, note=" (0 = embeddings)"),
         "--remove-layers: layer 7 out of range 0..4 (0 = embeddings)"),
    ]:
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == message


def test_commands_default_to_the_registry_model():
    from residscope.apps.cli_common import model_name
    from residscope.model.registry import DEFAULT_MODEL

    assert model_name(None) == DEFAULT_MODEL and model_name("zoo-rope") == "zoo-rope"
