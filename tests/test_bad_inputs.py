"""Issue 14, CLI side: bad input gives one line naming the culprit and exit code 2, before any work; nothing of the
user's is overwritten and nothing is left half-written; no silent NaN; no hang. Each case runs through the CLI (in
process, on the zoo models: 4 layers, d_model 128, 128 positions) and, where there is one, through the Python API.
Loading-side cases (bad config.json, non-finite tensors, GGUF) are in test_bad_inputs_loading.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from residscope.model.errors import InputError

ZOO = Path(__file__).resolve().parent.parent / "model" / "zoo"
FAST = ["--seq-len", "32", "--samples", "2", "--batch-size", "2"]


def assert_one_line_error(result, *culprits: str) -> str:
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("residscope: error: "), err
    for culprit in culprits:
        assert culprit in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Contents and mtimes of every file under `folder` (including hidden ones): 'untouched' means equal snapshots."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def copy_zoo(tmp_path: Path, name: str = "rope", **config) -> Path:
    """A copy of a zoo model with some config.json keys changed."""
    folder = tmp_path / f"zoo-{name}"
    shutil.copytree(ZOO / name, folder)
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(config)
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder nobody can create files in: chmod 555, or for root (who ignores modes) the immutable attribute."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK):  # root
        folder.chmod(0o755)
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable:
            pytest.skip("cannot make a folder unwritable here (root without chattr)")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


# ---- files overwritten or left behind ---------------------------------------------------------------------------------
def test_positional_refuses_a_non_empty_out_folder(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": 1}')
    (out / "norms.html").write_text("<html>my figure</html>")
    before = snapshot(out)
    assert_one_line_error(run_cli(["positional", "--model", "zoo-rope", "--out", out, *FAST], capsys), "--out", "--force")
    assert snapshot(out) == before


def test_positional_force_replaces_the_folder_whole(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": 1}')
    code, _, err = run_cli(["positional", "--model", "zoo-rope", "--out", out, "--force", *FAST, "--remove-layers", "",
                        "--probe-tokens", "0", "--json"], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seq_len"] == 32 and sorted(p.name for p in out.iterdir()) == summary["files"]
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # no temp folder left beside it


def test_bi_html_is_written_to_a_temp_name_then_renamed(tmp_path, capsys, monkeypatch):
    import plotly.graph_objects as go

    target = tmp_path / "bi.html"
    target.write_text("my old figure")
    before = snapshot(tmp_path)

    def half_then_fail(self, path, *a, **kw):
        Path(path).write_text("<html>half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(go.Figure, "write_html", half_then_fail)
    with pytest.raises(OSError, match="No space"):  # an OS failure is not bad input: it keeps its traceback
        run_cli(["bi", "--model", "zoo-rope", *FAST, "--html", target], capsys)
    assert snapshot(tmp_path) == before  # the old file intact, no temp file left


@pytest.mark.parametrize("argv, culprit", [
    (["positional", "--model", "does-not-exist", "--out", "{locked}/out", *FAST], "--out"),
    (["prune", "--model", "does-not-exist", "--remove", "1", "--out", "{locked}/out"], "--out"),
    (["bi", "--model", "does-not-exist", "--html", "{locked}/bi.html"], "--html"),
    (["extend", "--model", "does-not-exist", "--html", "{locked}/ext.html"], "--html"),
    (["passkey", "--model", "does-not-exist", "--html", "{locked}/pk.html"], "--html"),
    (["rope-bound", "--length", "1024", "--html", "{locked}/rb.html"], "--html"),
    (["demo", "--model", "does-not-exist", "--out", "{locked}/demo"], "--out"),
])
def test_unwritable_output_is_refused_before_the_work(unwritable_dir, argv, culprit, capsys):
    """The model does not exist, so a message about the output proves the output was checked first."""
    argv = [a.replace("{locked}", str(unwritable_dir)) for a in argv]
    line = assert_one_line_error(run_cli(argv, capsys), culprit, "cannot write in")
    assert str(unwritable_dir) in line


@pytest.mark.parametrize("option", ["--out", "--html"])
def test_output_below_a_file_is_refused(tmp_path, option, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    argv = (["positional", "--model", "zoo-rope", "--out", tmp_path / "notes.txt" / "out", *FAST] if option == "--out"
            else ["bi", "--model", "zoo-rope", "--html", tmp_path / "notes.txt" / "bi.html"])
    assert_one_line_error(run_cli(argv, capsys), option, "notes.txt", "not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"


_KILLED_WRITER = """
import sys, time
from residscope.common.atomic import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "model.safetensors").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    time.sleep(60)
"""


def test_temp_folders_of_a_killed_run_are_cleaned_by_the_next_write(tmp_path):
    from residscope.common.atomic import atomic_write_text, clean_stale

    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "pruned")], stdout=subprocess.PIPE,
                            text=True)
    left = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)  # no `finally` runs: the temp folder stays
    proc.wait()
    assert left.is_dir() and left.name.startswith(".pruned.tmp-")
    alive = tmp_path / f".other.tmp-{os.getppid()}-0123abcd"  # a live process's temp file (a concurrent run)
    alive.write_text("in progress")
    atomic_write_text(tmp_path / "summary.json", "{}")
    assert not left.exists() and alive.exists()
    assert clean_stale(tmp_path) == []


# ---- silent wrong results -----------------------------------------------------------------------------------------------
def nan_weight_model(tmp_path: Path) -> Path:
    """zoo-rope with one NaN in the final norm weight (the loader may refuse it; either way no 'perplexity nan')."""
    from safetensors.torch import load_file, save_file

    folder = copy_zoo(tmp_path)
    state = load_file(folder / "model.safetensors")
    state["model.norm.weight"][3] = float("nan")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_ppl_never_prints_nan(tmp_path, capsys):
    folder = nan_weight_model(tmp_path)
    for extra in ([], ["--json"]):
        code, out, err = run_cli(["ppl", "--model", folder, "--seq-len", "32", "--samples", "2", *extra], capsys)
        assert code == 2 and out == "", out
        line = err.strip().splitlines()[-1]
        assert line.startswith("residscope: error: ") and ("finite" in line or "NaN" in line or "nan" in line), err


def test_perplexity_api_refuses_non_finite_logits():
    from residscope.analyses.perplexity import perplexity
    from residscope.model import load_model

    m = load_model("zoo-rope")
    with torch.no_grad():
        m.unembed.weight[5] = float("nan")
    with pytest.raises(InputError, match="perplexity: the mean negative log-likelihood is nan"):
        perplexity(m, [torch.randint(0, 100, (2, 16))], progress=False)


def test_json_writer_refuses_nan_naming_the_field():
    from residscope.apps.cli_output import json_text

    assert json.loads(json_text({"ppl": 3.5, "rows": [1, 2.0]})) == {"ppl": 3.5, "rows": [1, 2.0]}
    with pytest.raises(InputError, match=r"results\[1\]\.ppl is nan"):
        json_text({"results": [{"ppl": 1.0}, {"ppl": math.nan}]})
    with pytest.raises(InputError, match="bound is inf"):
        json_text({"bound": math.inf})


@pytest.mark.parametrize("argv, culprit", [
    (["extend", "--model", "zoo-rope", "--method", "pi", "--factor", "inf"], "factor"),
    (["extend", "--model", "zoo-rope", "--method", "pi", "--factor", "nan"], "factor"),
    (["extend", "--model", "zoo-window", "--method", "window", "--factor", "inf"], "factor"),
    (["extend", "--model", "zoo-window", "--method", "window", "--logit-scale", "0"], "--logit-scale"),
    (["extend", "--model", "zoo-window", "--method", "window", "--logit-scale", "nan"], "--logit-scale"),
    (["extend", "--model", "zoo-rope", "--max-tokens", "-500"], "--max-tokens must be an integer >= 0"),
    (["extend", "--model", "zoo-rope", "--window", "0"], "--window must be an integer >= 1"),
    (["passkey", "--model", "zoo-rope", "--factor", "inf"], "factor"),
    (["rope-bound", "--length", "1024", "--grid-step", "inf"], "--grid-step"),
    (["rope-bound", "--length", "1024", "--grid-step", "0"], "--grid-step"),
    (["rope-bound", "--base", "10000", "--max-m", str(10**12)], "--max-m"),
    (["rope-bound", "--base", "inf"], "--base"),
])
def test_absurd_numbers_are_one_line_errors(argv, culprit, capsys):
    assert_one_line_error(run_cli(argv, capsys), culprit)


def test_rope_bound_refuses_a_model_with_zero_positions(tmp_path, capsys):
    folder = copy_zoo(tmp_path, max_position_embeddings=0)
    assert_one_line_error(run_cli(["rope-bound", "--model", folder], capsys), "max_position_embeddings")


def test_extension_api_validates_its_arguments():
    from residscope.analyses import extension as ext
    from residscope.model import load_model

    m = load_model("zoo-window")
    bad = [(dict(method="pi", factor=math.inf), "factor"), (dict(method="window", factor=math.inf), "factor"),
           (dict(method="window", factor=2, logit_scale=0), "logit_scale"),
           (dict(method="window", factor=2, logit_scale=-1), "logit_scale"),
           (dict(method="window", factor=2, logit_scale=math.nan), "logit_scale"),
           (dict(method="pi", factor=2, window=0), "window"), (dict(method="pv-replace", factor=2, ratio=math.nan), "ratio")]
    for kw, culprit in bad:
        with pytest.raises(ValueError, match=culprit) as e, ext.apply_method(m, **kw):  # API users may catch ValueError
            pass
        assert isinstance(e.value, InputError)
    with pytest.raises(InputError, match="max_tokens"):
        ext.evaluation_tokens(m, -500)
    with pytest.raises(InputError, match="window must be a positive integer"):
        ext.trained_window(m, 0)


def test_rope_bound_api_validates_and_limits_its_arguments():
    from residscope.analyses import rope_bound as rb
    from residscope.model import load_config

    for kw, culprit in [(dict(grid_step=math.inf), "grid_step"), (dict(grid_step=1e-12), "grid_step"),
                        (dict(refine_rtol=math.nan), "refine_rtol"), (dict(max_m=0), "max_m")]:
        with pytest.raises(InputError, match=culprit):
            rb.base_lower_bound(1024, 64, **kw)
    with pytest.raises(InputError, match=r"length must be an integer in 1\.\.4,194,304"):
        rb.base_lower_bound(10**12, 64)
    with pytest.raises(InputError, match="max_m"):
        rb.context_bound(1e4, 64, max_m=10**12)
    with pytest.raises(InputError, match="base must be a finite number"):
        rb.context_bound(math.inf, 64)
    cfg = load_config("zoo-rope")
    cfg.max_position_embeddings = 0
    with pytest.raises(InputError, match="max_position_embeddings must be >= 1"):
        rb.model_bounds(cfg)


@pytest.mark.parametrize("command", ["ppl", "positional"])
def test_seq_len_beyond_max_positions_warns_once(command, tmp_path, capsys):
    out = ["--out", tmp_path / "out", "--remove-layers", "", "--probe-tokens", "0"] if command == "positional" else []
    code, _, err = run_cli([command, "--model", "zoo-rope", "--seq-len", "200", "--samples", "2", "--batch-size", "2",
                        *out, "--json"], capsys)
    assert code == 0, err
    warnings_ = [line for line in err.splitlines() if "warning" in line]
    assert warnings_ == ["residscope: warning: seq_len=200 is beyond the model's max_position_embeddings (128): "
                         "results measure behaviour past the trained context"], err


# ---- tracebacks and messages that blame the wrong thing --------------------------------------------------------------
def test_text_file_that_cannot_be_read(tmp_path, capsys, monkeypatch):
    text = tmp_path / "corpus.txt"
    text.write_text("some text " * 100)
    real = Path.read_bytes

    def denied(self):
        if self == text:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)  # root reads any file, so deny it here
    assert_one_line_error(run_cli(["ppl", "--model", "zoo-rope", "--text", text, *FAST], capsys),
                          "corpus.txt", "Permission denied")


def test_text_folder_and_missing_text(tmp_path, capsys):
    assert_one_line_error(run_cli(["ppl", "--model", "zoo-rope", "--text", tmp_path, *FAST], capsys), str(tmp_path), "folder")
    assert_one_line_error(run_cli(["bi", "--model", "zoo-rope", "--text", tmp_path / "no.txt", *FAST], capsys), "no.txt")


def test_non_utf8_text_names_the_file_and_the_offset(tmp_path, capsys):
    text = tmp_path / "latin1.txt"
    text.write_bytes("hello world ".encode() + "café".encode("latin-1"))  # é is byte 0xe9 at offset 15
    line = assert_one_line_error(run_cli(["ppl", "--model", "zoo-rope", "--text", text, *FAST], capsys), "latin1.txt")
    assert "offset 15" in line and "0xe9" in line


@pytest.mark.parametrize("device, culprit", [("cuda", "'cuda' is not available"), ("cuda:3", "'cuda:3'"),
                                             ("banana", "'banana' is not a torch device")])
def test_device_that_is_not_there(device, culprit, capsys):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_line_error(run_cli(["ppl", "--model", "zoo-rope", "--device", device, *FAST], capsys), "device", culprit)


def test_app_with_a_missing_model_is_one_line(capsys, monkeypatch):
    def no_exec(*a):
        raise AssertionError("streamlit must not start for a model that does not exist")

    monkeypatch.setattr(os, "execve", no_exec)
    assert_one_line_error(run_cli(["app", "--model", "does-not-exist"], capsys), "does-not-exist", "not a model alias")


def test_explorer_logs_bad_input_in_one_line_and_bugs_with_traceback(caplog):
    import logging

    from residscope.apps.errors import log_failure, one_line
    from residscope.model.errors import MissingFileError

    log = logging.getLogger("residscope.explorer")
    missing = MissingFileError("'nope' is not a model alias, folder or GGUF file")
    with caplog.at_level("WARNING", logger="residscope.explorer"):
        try:
            raise missing
        except MissingFileError as e:
            log_failure(log, e, "loading nope")
        try:
            raise RuntimeError("a bug")
        except RuntimeError as e:
            log_failure(log, e, "page x")
    bad_input, bug = caplog.records
    assert bad_input.exc_info is None and bad_input.getMessage() == "loading nope: 'nope' is not a model alias, folder or GGUF file"
    assert bug.exc_info is not None
    assert one_line(missing) == "'nope' is not a model alias, folder or GGUF file"
    assert one_line(RuntimeError("a bug\nmore")) == "RuntimeError: a bug"


# ---- hangs ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, culprit", [
    (["rope-bound", "--length", str(10**12)], "--length must be an integer in [1, 4194304]"),
    (["rope-bound", "--length", "1024", "--grid-step", "1e-12"], "--grid-step must be a finite number in [1e-05, 1]"),
    (["generate", "hello", "--model", "zoo-rope", "--max-new-tokens", str(10**12)], "--max-new-tokens"),
])
def test_hopeless_sizes_are_refused_at_once(argv, culprit, capsys):
    t0 = time.perf_counter()
    assert_one_line_error(run_cli(argv, capsys), culprit)
    assert time.perf_counter() - t0 < 60  # generous: a hang would take hours, not a flaky timing assertion


def test_ctrl_c_stops_cleanly_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def interrupted_midway(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted_midway)
    code, out, err = run_cli(["prune", "--model", "zoo-rope", "--remove", "1", "--out", tmp_path / "pruned", *FAST,
                          "--eval-samples", "2", "--json"], capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "residscope: interrupted", err
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp folder


# ---- the error classes --------------------------------------------------------------------------------------------------
def test_user_errors_are_value_errors_and_one_family():
    from residscope.model.config import ConfigError
    from residscope.model.errors import CheckpointError, MissingFileError
    from residscope.model.registry import ModelNotInstalledError

    for cls in (ConfigError, CheckpointError, MissingFileError, ModelNotInstalledError):
        assert issubclass(cls, InputError) and issubclass(cls, ValueError)
    assert issubclass(MissingFileError, FileNotFoundError)


def test_decoder_argument_errors_are_input_errors():
    """The decoder's own checks (set by other parts of issue 14) use the same class, so the CLI shows them in one line."""
    from residscope.model import load_model

    m = load_model("zoo-rope")
    ids = torch.tensor([[1, 2, 3]])
    for call, culprit in [(lambda: m.generate(ids, max_new_tokens=2, do_sample=True, top_k=0), "top_k"),
                          (lambda: m.set_attn_logit_scale(0.0), "scale"), (lambda: m.set_window(0), "window"),
                          (lambda: m.set_rope(theta=math.nan), "theta")]:
        with pytest.raises(InputError, match=culprit):
            call()


def test_library_raises_input_error_for_user_mistakes(tmp_path):
    from residscope.analyses.corpus import load_text
    from residscope.common.atomic import check_output_dir, check_output_file
    from residscope.model.loading import parse_device
    from residscope.model.registry import check_source

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for call, culprit in [(lambda: load_text(tmp_path / "missing.txt"), "missing.txt"),
                          (lambda: parse_device("banana"), "banana"),
                          (lambda: check_source("does-not-exist"), "does-not-exist"),
                          (lambda: check_output_dir(tmp_path / "full", "--out"), "--out"),
                          (lambda: check_output_file(tmp_path / "full", "--html"), "--html")]:
        with pytest.raises(InputError, match=culprit):
            call()
    assert check_output_dir(tmp_path / "full", "--out", force=True) == tmp_path / "full"
    assert check_output_dir(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


# ---- issue 24: outputs never overwrite a user's files or the input ---------------------------------------------------
def test_demo_refuses_a_non_empty_out_and_leaves_the_users_files(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "pruned").mkdir(parents=True)
    (out / "summary.json").write_text('{"mine": 1}')
    (out / "pruned" / "notes.txt").write_text("my notes")
    before = snapshot(out)
    assert_one_line_error(run_cli(["demo", "--model", "zoo-rope", "--out", out], capsys), "--out", "not empty", "--force")
    assert snapshot(out) == before


@pytest.mark.parametrize("out, culprit", [("{model}", "is the input"), ("{model}/sub", "inside the input folder"),
                                          ("{tmp}", "contains the input")])
def test_prune_never_writes_over_the_checkpoint_it_reads_even_with_force(tmp_path, out, culprit, capsys):
    model = copy_zoo(tmp_path)
    before = snapshot(model)
    target = out.format(model=model, tmp=tmp_path)
    assert_one_line_error(run_cli(["prune", "--model", model, "--layers", "1", "--out", target, "--force"], capsys),
                          "--out", culprit)
    assert snapshot(model) == before


def test_html_output_inside_the_model_folder_or_over_the_text_file_is_refused(tmp_path, capsys):
    model = copy_zoo(tmp_path)
    text = tmp_path / "corpus.txt"
    text.write_text("some text " * 500)
    assert_one_line_error(run_cli(["bi", "--model", model, "--html", model / "bi.html", *FAST], capsys), "--html", "inside")
    assert_one_line_error(run_cli(["bi", "--model", model, "--text", text, "--html", text, *FAST], capsys), "--html",
                          "is the input")


def test_output_checks_follow_symlinks(tmp_path, capsys):
    model = copy_zoo(tmp_path)
    (tmp_path / "link").symlink_to(model)
    assert_one_line_error(run_cli(["positional", "--model", model, "--out", tmp_path / "link", "--force", *FAST], capsys),
                          "is the input")


def test_findings_refuses_to_replace_earlier_results_without_force(tmp_path):
    from residscope.studies import findings

    (tmp_path / "rope-table.json").write_text('{"mine": 1}')
    with pytest.raises(InputError, match=r"rope-table.json holds earlier results \(use --force"):
        findings.main(["rope-table", "--out", str(tmp_path), "--lengths-table", "1024", "--head-dim", "16"])
    assert (tmp_path / "rope-table.json").read_text() == '{"mine": 1}'


def test_save_pretrained_refuses_the_models_own_folder(tmp_path):
    from residscope.model import load_model

    model_dir = copy_zoo(tmp_path)
    model = load_model(model_dir)
    with pytest.raises(InputError, match="is the input"):
        model.save_pretrained(model_dir, force=True)


# ---- issue 24: every numeric option has a declared range -------------------------------------------------------------
def test_every_numeric_option_has_a_declared_range():
    """The structural check: a new command or option of type int / float must declare its range in
    apps/cli_common.RANGES, which every command's options are checked against when the CLI is built."""
    from residscope.apps.cli import app
    from residscope.apps.cli_common import numeric_options, range_of

    missing = [f"{r.name} {option}" for r in app.registered_commands for option, _, _ in numeric_options(r.callback)
               if range_of(r.name, option) is None]
    assert not missing, f"declare a range in apps/cli_common.RANGES for: {missing}"


@pytest.mark.parametrize("argv, culprit", [
    (["ppl", "--model", "zoo-rope", "--samples", "0"], "--samples must be an integer in [1, "),
    (["ppl", "--model", "zoo-rope", "--seq-len", "1"], "--seq-len must be an integer in [2, "),
    (["bi", "--model", "zoo-rope", "--batch-size", "0"], "--batch-size"),
    (["positional", "--model", "zoo-rope", "--probe-tokens", "-5", "--out", "x"], "--probe-tokens"),
    (["positional", "--model", "zoo-rope", "--cos-threshold", "0", "--out", "x"], "--cos-threshold must be a finite number in (0, 1]"),
    (["demo", "--remove-fraction", "nan"], "--remove-fraction"),
    (["generate", "hi", "--model", "zoo-rope", "--top-p", "1.5", "--sample"], "--top-p"),
    (["passkey", "--model", "zoo-rope", "--lengths", "1000000"], "over the limit of 32768"),
    (["extend", "--model", "zoo-rope", "--lengths", "128,40000"], "over the limit of 32768"),
    (["prune", "--model", "zoo-rope", "--layers", "", "--out", "x"], "--layers: no layer given"),
    (["prune", "--model", "zoo-rope", "--layers", " , ", "--out", "x"], "--layers: no layer given"),
    (["app", "--port", "0"], "--port"),
])
def test_numeric_options_outside_their_range_are_refused_before_any_work(argv, culprit, capsys):
    assert_one_line_error(run_cli(argv, capsys), culprit)


def test_whitespace_only_text_is_refused(tmp_path, capsys):
    text = tmp_path / "blank.txt"
    text.write_text(" \n\t\n  " * 300)
    assert_one_line_error(run_cli(["ppl", "--model", "zoo-rope", "--text", text, *FAST], capsys), str(text), "no text")


# ---- issue 24: Decoder API arguments ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo_rope():
    from residscope.model import load_model

    return load_model("zoo-rope")


@pytest.mark.parametrize("call, culprit", [
    (lambda m, ids: m(ids[:, :1], return_type="loss"), "nothing to predict"),
    (lambda m, ids: m(ids, return_type="loss", attention_mask=torch.zeros_like(ids)), "nothing to predict"),
    (lambda m, ids: m(ids, stop_at_layer=5), "stop_at_layer=5 out of range for 4 layers"),
    (lambda m, ids: m(ids, stop_at_layer=-5), "stop_at_layer=-5"),
    (lambda m, ids: m(ids, position_ids=torch.arange(3)), "position_ids has shape (3,)"),
    (lambda m, ids: m(ids, position_ids=torch.zeros(ids.shape)), "position_ids must be an integer tensor"),
    (lambda m, ids: m.to_tokens(None), "got NoneType"),
    (lambda m, ids: m.to_string([1, 2, 99999]), "token id 99999 is outside the vocabulary [0, 2047]"),
    (lambda m, ids: m.to_string(torch.tensor([-1])), "token id -1"),
    (lambda m, ids: m.to_str_tokens(torch.tensor([5, 4096])), "token id 4096 is outside"),
])
def test_decoder_api_refuses_in_one_line(zoo_rope, call, culprit):
    ids = zoo_rope.to_tokens("The quick brown fox")
    with pytest.raises(InputError) as e:
        call(zoo_rope, ids)
    assert culprit in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_valid_position_ids_and_negative_stop_at_layer_still_work(zoo_rope):
    ids = zoo_rope.to_tokens("The quick brown fox")
    pos = torch.arange(ids.shape[1])
    torch.testing.assert_close(zoo_rope(ids, position_ids=pos), zoo_rope(ids))
    torch.testing.assert_close(zoo_rope(ids, stop_at_layer=-1), zoo_rope(ids, stop_at_layer=3))
