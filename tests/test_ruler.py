"""RULER's synthetic tasks: prompts hold the exact needles at the requested depth and fill the requested length, the
scores equal RULER's own functions, everything is seeded, bad requests get one line, and `residscope ruler` runs end to
end on a tiny random model (which scores ~0: the tests check the machinery, not the model)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from tiny_llama import make_tiny_checkpoint

from residscope.analyses import ruler, ruler_tasks as rt
from residscope.common.errors import InputError

# a prompt + its generation budget falls short of the requested length by less than one haystack unit: at most ~50 tokens
# of the tiny tokenizer (a needle sentence with two UUIDs); we allow 64
TOLERANCE = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ruler") / "tiny")


@pytest.fixture(scope="module")
def tok(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny))


@pytest.fixture(scope="module")
def essay():
    return ruler.essay_haystack()


def length_for(task: str) -> int:
    return 2048 if task == "cwe" else 1024  # cwe's example and smallest list need ~1300 tiny-tokenizer tokens


# ---------------------------------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", list(rt.TASKS))
def test_every_task_fills_its_length_within_the_tolerance(tok, essay, task):
    length = length_for(task)
    p = rt.build_prompt(tok, task, length, 0.5, 0, essay=essay)
    assert p.ids.tolist() == tok(p.text)["input_ids"]
    used = len(p.ids) + p.max_new_tokens
    assert length - TOLERANCE < used <= length
    assert p.max_new_tokens == {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}[rt.TASKS[task].kind]
    assert p.references and all(r.lower() in p.text.lower() for r in p.references)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_noise_needle_is_exact_and_at_its_depth(tok, depth):
    p = rt.build_prompt(tok, "niah_single_1", 1024, depth, 0)
    value = p.references[0]
    assert re.fullmatch(r"\d{7}", value)
    needle = p.needles[0]
    key = re.fullmatch(r"One of the special magic numbers for (\S+) is: (\d{7})\.", needle).group(1)
    assert needle.endswith(f"{value}.") and p.text.count(needle) == 1 and p.text.count(value) == 1
    adj, noun = key.split("-")
    assert adj in rt.ADJECTIVES and noun in rt.NOUNS
    before = p.text[:p.text.index(needle)].count(rt.NOISE)
    assert before == round(depth * p.haystack_units) and p.text.count(rt.NOISE) == p.haystack_units
    # RULER's singular wording for one answer, and the answer prefix last
    assert p.text.startswith("A special magic number is hidden within the following text. Make sure to memorize it. "
                             "I will quiz you about the number afterwards.\n")
    assert p.text.endswith(f"What is the special magic number for {key} mentioned in the provided text? "
                           f"The special magic number for {key} mentioned in the provided text is")


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_essay_needle_sits_at_its_depth_of_the_evaluation_split(tok, essay, depth):
    p = rt.build_prompt(tok, "niah_single_2", 1024, depth, 0, essay=essay)
    needle = p.needles[0]
    head, tail = p.text.split("\n", 1)[1].rsplit("\nWhat is", 1)[0].split(needle)
    haystack = " ".join(essay[:p.haystack_units])
    assert (head + tail).replace(" ", "") == haystack.replace(" ", "")  # the needle is inserted, nothing else changes
    sentences = rt.split_sentences(haystack)  # depth counts sentences, as RULER's insertion does
    assert len(rt.split_sentences(head)) == round(depth * len(sentences))


def test_multi_needle_tasks_hide_every_needle_and_ask_the_right_ones(tok, essay):
    mk = rt.build_prompt(tok, "niah_multikey_1", 1024, 0.5, 0, essay=essay)
    assert len(mk.needles) == 4 and len(mk.references) == 1 and all(mk.text.count(n) == 1 for n in mk.needles)
    assert mk.needles[0].endswith(f"{mk.references[0]}.")  # the asked needle is the one placed at the depth
    mv = rt.build_prompt(tok, "niah_multivalue", 1024, 0.5, 0, essay=essay)
    assert len(mv.references) == 4 and len({n.split(" is: ")[0] for n in mv.needles}) == 1
    assert mv.text.startswith("Some special magic numbers are hidden") and mv.text.endswith("text are")
    mq = rt.build_prompt(tok, "niah_multiquery", 1024, 0.5, 0, essay=essay)
    keys = [n.split(" for ")[1].split(" is: ")[0] for n in mq.needles]
    assert len(mq.references) == 4 and ", and " in mq.text.rsplit("\n", 1)[1]
    assert all(k in mq.text.rsplit("\n", 1)[1] for k in keys)
    mk3 = rt.build_prompt(tok, "niah_multikey_3", 1024, 0.5, 0)
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(rf"One of the special magic uuids for {uuid} is: {uuid}\.", mk3.needles[0])
    lines = mk3.text.split("\n")
    assert sum(line.startswith("One of the special magic uuids for") for line in lines) == mk3.haystack_units + 1


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_variable_tracking_chain_is_in_order_after_an_example(tok, depth):
    p = rt.build_prompt(tok, "vt", 1024, depth, 0)
    assert len(p.references) == 5 and all(re.fullmatch(r"[A-Z]{5}", v) for v in p.references)
    example, main = p.text.split("\n\nMemorize", 1)[0], "Memorize" + p.text.split("\n\nMemorize", 1)[1]
    assert example.startswith("Memorize and track") and re.search(r"they are:  ([A-Z]{3} ){4}[A-Z]{3}$", example)  # RULER: prefix + " " + answer
    lines = main.split("\n")
    where = [lines.index(s) for s in p.needles]
    assert where == sorted(where)
    value = p.needles[0].split(" = ")[1]
    assert p.needles[0] == f"VAR {p.references[0]} = {value}"
    assert p.needles[1] == f"VAR {p.references[1]} = VAR {p.references[0]} "
    noise_before = sum(1 for line in lines[:where[0]] if line == rt.NOISE)
    assert noise_before == round(depth * p.haystack_units)
    assert main.endswith(f"5 variables are assigned the value {value}, they are: ")


@pytest.mark.parametrize("length", [2048, 8192])  # the tiny tokenizer needs ~4,900 tokens for the long form
def test_common_words_repeat_as_ruler_says(tok, length):
    p = rt.build_prompt(tok, "cwe", length, None, 0)
    main = p.text.rsplit("\nBelow is a numbered list", 1)[1]
    counts = Counter(re.findall(r"\d+\. (\w+)", main.split("\nQuestion:")[0]))
    common, others = (6, 1) if length < 4096 else (30, 3)  # RULER: fewer repeats below 4096 tokens
    assert p.depth is None and len(p.references) == 10
    assert all(counts[w] == common for w in p.references)
    assert set(counts.values()) == {common, others} and len(counts) == p.haystack_units


def test_frequent_words_answers_are_the_three_most_frequent(tok):
    p = rt.build_prompt(tok, "fwe", 2048, None, 0)
    words = p.text.split("coded words. ", 1)[1].split("\nQuestion:")[0].split(" ")
    ranked = [w for w, _ in Counter(words).most_common()]
    assert ranked[0] == "..." and ranked[1:4] == p.references
    assert all(re.fullmatch(r"[a-z]{6}", w) for w in p.references)


def test_prompts_are_seeded_and_keep_their_needles_across_lengths_and_depths(tok, essay):
    a = rt.build_prompt(tok, "niah_multikey_1", 1024, 0.3, 1, seed=7, essay=essay)
    again = rt.build_prompt(tok, "niah_multikey_1", 1024, 0.3, 1, seed=7, essay=essay)
    assert a.text == again.text and a.references == again.references
    longer = rt.build_prompt(tok, "niah_multikey_1", 2048, 0.9, 1, seed=7, essay=essay)
    assert longer.needles == a.needles and longer.text != a.text
    assert rt.build_prompt(tok, "niah_multikey_1", 1024, 0.3, 1, seed=8, essay=essay).needles != a.needles
    assert rt.build_prompt(tok, "niah_multikey_1", 1024, 0.3, 2, seed=7, essay=essay).needles != a.needles
    grid = ruler.ruler_grid(["vt", "fwe"], [1024], [0.0, 1.0], 2)
    assert grid == [("vt", 1024, 0.0, 0), ("vt", 1024, 0.0, 1), ("vt", 1024, 1.0, 0), ("vt", 1024, 1.0, 1),
                    ("fwe", 1024, None, 0), ("fwe", 1024, None, 1)]
    assert [p.text for p in ruler.ruler_prompts(tok, grid)] == [p.text for p in ruler.ruler_prompts(tok, grid)]


def test_fixed_word_lists():
    assert (len(rt.ADJECTIVES), len(rt.NOUNS), len(rt.VERBS)) == (297, 1301, 516)
    assert len(rt.CWE_WORDS) == 2054 and all(re.fullmatch(r"[a-z]{3,12}", w) for w in rt.CWE_WORDS)
    assert list(rt.ADJECTIVES) == sorted(rt.ADJECTIVES) and rt.KEY_WORDS[0] == f"{rt.ADJECTIVES[0]}-{rt.NOUNS[0]}"
    assert rt.DEPTH_GRID[:4] == (0, 3, 5, 8) and rt.DEPTH_GRID[-1] == 100 and len(rt.DEPTH_GRID) == 40


# ---------------------------------------------------------------------------------------------------------------------
# scoring: RULER's functions (scripts/eval/synthetic/constants.py at c3f5e3b, Apache-2.0), verbatim, as the reference
# ---------------------------------------------------------------------------------------------------------------------
def ruler_string_match_part(preds, refs):
    score = sum([max([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) for pred, ref in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


def ruler_string_match_all(preds, refs):
    score = sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref) for pred, ref in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


HAND = [
    (["The special magic number is 1234567."], [["1234567"]], 100.0, 100.0),
    (["1234567 and 7654321", "nothing here"], [["1234567", "7654321", "1111111"], ["42"]], 33.33, 50.0),
    (["ABCDE FGHIJ", "abcde"], [["ABCDE", "FGHIJ", "KLMNO"], ["ABCDE"]], 83.33, 100.0),
    (["", "a b c"], [["x"], ["A", "B", "C", "D"]], 37.5, 50.0),
]


@pytest.mark.parametrize("preds,refs,match_all,match_part", HAND)
def test_scores_equal_rulers_functions(preds, refs, match_all, match_part):
    assert ruler.string_match_all(preds, refs) == ruler_string_match_all(preds, refs) == match_all
    assert ruler.string_match_part(preds, refs) == ruler_string_match_part(preds, refs) == match_part


def test_predictions_are_postprocessed_as_ruler_does():
    assert ruler.postprocess_pred("  1234567\x00abc\tdef \n") == "1234567\nabc\ndef"
    with pytest.raises(InputError, match="as many predictions"):
        ruler.string_match_all([], [])


# ---------------------------------------------------------------------------------------------------------------------
# bad requests: one line naming the argument
# ---------------------------------------------------------------------------------------------------------------------
def test_bad_requests_name_the_argument(tok, essay):
    with pytest.raises(InputError, match=r"^--lengths: 512 is too short for task vt"):
        rt.build_prompt(tok, "vt", 512, 0.5, 0)
    with pytest.raises(InputError, match=r"^--lengths: 200 is too short for task niah_single_1"):
        rt.build_prompt(tok, "niah_single_1", 200, 0.5, 0)
    with pytest.raises(InputError, match=r"^--lengths: 65536 is too long for task niah_single_2: the whole essay haystack"):
        rt.build_prompt(tok, "niah_single_2", 65536, 0.5, 0, essay=essay)
    with pytest.raises(InputError, match=r"^--lengths: 200000 is too long for task cwe: the whole built-in word list"):
        rt.build_prompt(tok, "cwe", 200000, None, 0)
    with pytest.raises(InputError, match=r"^--tasks: unknown task 'niah'"):
        rt.parse_tasks("niah_single_1,niah")
    with pytest.raises(InputError, match=r"^--samples must be an integer >= 1, got 0"):
        ruler.check_request(["vt"], [1024], [0.5], 0)
    with pytest.raises(InputError, match=r"^--depths"):
        ruler.check_request(["vt"], [1024], [1.5], 1)
    assert rt.parse_tasks("all") == list(rt.TASKS) and rt.parse_tasks("vt, fwe,vt") == ["vt", "fwe"]


@pytest.mark.parametrize("args,needle", [
    (["--tasks", "niah_single_1,bogus"], "--tasks: unknown task 'bogus'"),
    (["--samples", "0"], "--samples must be an integer in [1, "),
    (["--lengths", "256", "--tasks", "vt"], "--lengths: 256 is too short for task vt"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--depths", "0.5,2"], "--depths"),
])
def test_cli_bad_input_is_one_line(tiny, capsys, args, needle):
    from residscope.apps.cli import main

    with pytest.raises(SystemExit) as e:
        main(["ruler", "--model", str(tiny), *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and needle in err


# ---------------------------------------------------------------------------------------------------------------------
# end to end on the tiny model
# ---------------------------------------------------------------------------------------------------------------------
def test_greedy_continuation_is_generates_tokens(tiny):
    """The prompt read without its [pos, vocab] logits, then the cache: the same tokens as model.generate (float64)."""
    import torch

    from residscope.model import load_model

    model = load_model(str(tiny), dtype="float64")
    for n in (1, 60):
        ids = torch.randint(1, 500, (1, n), generator=torch.Generator().manual_seed(n))  # [1, n]
        expected = model.generate(ids, max_new_tokens=12)[0, n:]
        assert ruler.greedy_continuation(model, ids, 12).tolist() == expected.tolist()
        assert ruler.greedy_continuation(model, ids, 12, use_cache=False).tolist() == expected.tolist()
    model.cfg.eos_token_id = int(expected[5])  # stops after the first EOS it produces, EOS included
    got = ruler.greedy_continuation(model, ids, 12).tolist()
    assert got[-1] == int(expected[5]) and got == expected.tolist()[:len(got)] and len(got) <= 6


def test_study_scores_every_cell_and_applies_the_method(tiny):
    from residscope.model import load_model

    model = load_model(str(tiny))
    result = ruler.ruler_study(model, "niah_single_1,fwe", [1024], [0.0, 1.0], samples=1, method="pi", progress=False)
    assert [(c.task, c.length, c.depth, c.n_samples) for c in result.cells] == [
        ("niah_single_1", 1024, 0.0, 1), ("niah_single_1", 1024, 1.0, 1), ("fwe", 1024, None, 1)]
    assert result.factor == 1024 / 128 and result.settings["rope_type"] == "linear"
    for c in result.cells:
        assert c.score == ruler_string_match_all(c.predictions, c.references)
        assert all(n + (128 if c.task.startswith("niah") else 50) <= 1024 for n in c.prompt_tokens)
    assert set(result.task_scores()) == {("niah_single_1", 1024), ("fwe", 1024)}
    assert set(result.depth_scores()) == {(0.0, 1024), (1.0, 1024)}
    assert model.rope_settings()[0].rope_type == "default"  # the method is undone afterwards
    from residscope.analyses.ruler_plots import ruler_figure, ruler_table

    fig = ruler_figure(result)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"] and list(fig.data[0].y) == ["niah_single_1", "fwe", "average"]
    assert "average" in ruler_table(result)


def test_cli_writes_json_and_heat_map(tiny, tmp_path, capsys):
    from residscope.apps.cli import main

    out = tmp_path / "runs" / "tiny.json"
    main(["ruler", "--model", str(tiny), "--tasks", "niah_single_1", "--lengths", "1024", "--depths", "0.5",
          "--samples", "1", "--seed", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "niah_single_1" in printed and "average" in printed
    data = json.loads(out.read_text())
    assert data["method"] == "none" and data["seed"] == 3 and data["tasks"] == ["niah_single_1"]
    assert data["task_scores"] == [{"task": "niah_single_1", "length": 1024, "score": data["cells"][0]["score"]}]
    assert data["cells"][0]["depth"] == 0.5 and len(data["cells"][0]["predictions"]) == 1
    assert out.with_suffix(".html").read_text().count("heatmap") >= 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.html", "tiny.json"]  # no temporaries left


@pytest.mark.slow
def test_cli_nproc_2_equals_nproc_1(tiny, capfd):
    from residscope.apps.cli import main

    args = ["ruler", "--model", str(tiny), "--tasks", "niah_single_1", "--lengths", "1024", "--depths", "0,1",
            "--samples", "1", "--json"]
    main(args)
    one = json.loads(capfd.readouterr().out)
    main(args + ["--nproc", "2"])
    two = json.loads(capfd.readouterr().out)
    assert two["cells"] == one["cells"]
