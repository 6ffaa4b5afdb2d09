"""The built-in corpus split: evaluation text is held out from calibration text (no copied sentence), deterministically."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from residscope.analyses import corpus


def test_no_60_character_window_of_evaluation_text_occurs_in_calibration_text():
    calibration, evaluation = corpus.builtin_text("calibration"), corpus.builtin_text("evaluation")
    shared = corpus.windows_of(calibration, 60) & corpus.windows_of(evaluation, 60)
    assert not shared, f"{len(shared)} shared windows, e.g. {next(iter(shared))!r}"
    # and the rule keeps most of the candidate topics' text: enough tokens for every command's defaults (32 x 256)
    assert len(evaluation) > 50_000


def test_overlap_rule_drops_only_overlapping_paragraphs_including_across_joins():
    reference = "alpha beta gamma delta. " * 4
    paragraphs = ["unique text one, long enough", "alpha beta gamma", "delta. alpha beta", "other unique text here"]
    # no single paragraph holds a 20-character window of the reference, but the joined 2nd and 3rd together do
    assert corpus.drop_overlapping(paragraphs, reference, 20, sep=" ") == [paragraphs[0], paragraphs[3]]
    assert corpus.drop_overlapping(paragraphs, "nothing in common", 20) == paragraphs


def test_split_is_deterministic_across_processes():
    code = ("import hashlib; from residscope.analyses.corpus import builtin_text; "
            "print(hashlib.sha256(builtin_text('evaluation').encode()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == hashlib.sha256(corpus.builtin_text("evaluation").encode()).hexdigest()
    assert corpus.builtin_text("evaluation") is corpus.builtin_text("evaluation")  # computed once per process
