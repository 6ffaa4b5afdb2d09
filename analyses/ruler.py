"""RULER's synthetic long-context tasks on a model (Hsieh et al. 2024; prompts in `ruler_tasks.py`): greedy decoding
with the KV cache, scored with RULER's `string_match_all`, per task, length and depth, under any context-extension
method of `extension.py`.

    result = ruler_study(model, ["niah_single_1", "vt"], [1024, 4096], depths=[0.0, 0.5, 1.0], samples=4,
                         method="yarn")
    result.task_scores()      # {(task, length): score in percent}
    result.length_scores()    # {length: mean over tasks}, RULER's "average" column

Scores are percentages as RULER reports them: a sample scores the fraction of its reference strings found
(case-insensitively) in the prediction, and a cell is RULER's `string_match_all` over its samples (rounded to 2
decimals, as RULER rounds). Predictions are RULER-post-processed (stripped, control characters to newlines).
Under torch.distributed each rank decodes its share of the prompts and the predictions are gathered on every rank.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from residscope.common.errors import InputError

from .ruler_tasks import TASKS, RulerPrompt, build_prompt, essay_words, parse_tasks, task_spec

DEFAULT_SEED = 42  # RULER's random_seed


# ---------------------------------------------------------------------------------------------------------------------
# scoring (RULER scripts/eval/synthetic/constants.py and evaluate.py, verbatim in behaviour)
# ---------------------------------------------------------------------------------------------------------------------
def postprocess_pred(text: str) -> str:
    """RULER's postprocess_pred: strip, turn every control character into a newline, strip again."""
    return re.sub(r"[\x00-\x1f]", "\n", text.strip()).strip()


def match_fraction(pred: str, refs: Sequence[str]) -> float:
    """One sample under string_match_all: the fraction of `refs` found in `pred`, case-insensitively."""
    return sum(1.0 if r.lower() in pred.lower() else 0.0 for r in refs) / len(refs)


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's metric of every synthetic task: mean over samples of the fraction of references found, in percent,
    rounded to 2 decimals."""
    if not preds or len(preds) != len(refs):
        raise InputError(f"string_match_all needs as many predictions as reference lists, got {len(preds)} and {len(refs)}")
    score = sum(match_fraction(p, r) for p, r in zip(preds, refs)) / len(preds) * 100
    return round(score, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's metric of its QA tasks: a sample scores 1 when any reference is found; in percent, 2 decimals."""
    if not preds or len(preds) != len(refs):
        raise InputError(f"string_match_part needs as many predictions as reference lists, got {len(preds)} and {len(refs)}")
    score = sum(max(1.0 if r.lower() in p.lower() else 0.0 for r in ref) for p, ref in zip(preds, refs)) / len(preds) * 100
    return round(score, 2)


# ---------------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class RulerCell:
    """One (task, length, depth): RULER's score over its samples, and what the model answered."""

    task: str
    length: int  # requested: prompt + generation budget
    depth: float | None  # None for cwe and fwe
    score: float  # string_match_all in percent
    n_samples: int
    prompt_tokens: list[int]
    predictions: list[str] = field(default_factory=list)
    references: list[list[str]] = field(default_factory=list)


@dataclass
class RulerResult:
    method: str
    factor: float
    seed: int
    samples: int
    cells: list[RulerCell]
    settings: dict = field(default_factory=dict)  # what apply_method set
    haystack: str = ""  # where the essay haystack came from

    def task_scores(self) -> dict[tuple[str, int], float]:
        """{(task, length): string_match_all over every sample at every depth}."""
        out = {}
        for task, length in dict.fromkeys((c.task, c.length) for c in self.cells):
            cells = [c for c in self.cells if c.task == task and c.length == length]
            out[task, length] = string_match_all([p for c in cells for p in c.predictions],
                                                 [r for c in cells for r in c.references])
        return out

    def length_scores(self) -> dict[int, float]:
        """{length: mean of the task scores}, RULER's average over tasks."""
        by_length: dict[int, list[float]] = {}
        for (_, length), score in self.task_scores().items():
            by_length.setdefault(length, []).append(score)
        return {length: round(sum(s) / len(s), 2) for length, s in by_length.items()}

    def depth_scores(self) -> dict[tuple[float, int], float]:
        """{(depth, length): string_match_all over the depth tasks' samples at that depth}."""
        out = {}
        for depth, length in dict.fromkeys((c.depth, c.length) for c in self.cells if c.depth is not None):
            cells = [c for c in self.cells if c.depth == depth and c.length == length]
            out[depth, length] = string_match_all([p for c in cells for p in c.predictions],
                                                  [r for c in cells for r in c.references])
        return out

    def to_dict(self) -> dict:
        return {"method": self.method, "factor": self.factor, "seed": self.seed, "samples": self.samples,
                "settings": self.settings, "haystack": self.haystack,
                "task_scores": [{"task": t, "length": n, "score": s} for (t, n), s in self.task_scores().items()],
                "length_scores": [{"length": n, "score": s} for n, s in self.length_scores().items()],
                "cells": [asdict(c) for c in self.cells]}


# ---------------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------------
def greedy_continuation(model, ids: torch.Tensor, max_new_tokens: int, *, use_cache: bool = True) -> torch.Tensor:
    """The greedy continuation [n_new] of one prompt `ids` [1, pos], stopping after EOS: `model.generate`'s tokens.

    With the KV cache, the prompt is read without its unembedding (`stop_at_layer`) and only the last position is
    unembedded: `generate` would materialise [pos, vocab] logits, 4.3 GB at 4k tokens for Gemma-3's 262k vocabulary.
    Without the cache (hooks that index positions), `model.generate(use_cache=False)`."""
    if not use_cache:
        out = model.generate(ids, max_new_tokens=max_new_tokens, use_cache=False)  # [1, pos + new]
        return out[0, ids.shape[1]:]
    from residscope.model.decoder import KVCache

    eos = model.cfg.eos_token_id
    eos = set([eos] if isinstance(eos, int) else list(eos or []))
    cache = KVCache()
    if ids.shape[1] > 1:
        model(ids[:, :-1], kv_cache=cache, stop_at_layer=len(model.blocks))  # fills the cache; [1, pos - 1, d_model]
    step, new = ids[:, -1:], []  # [1, 1]
    for _ in range(max_new_tokens):
        logits = model(step, kv_cache=cache)[:, -1]  # [1, vocab]
        nxt = int(logits.float().argmax(-1))
        new.append(nxt)
        if nxt in eos:
            break
        step = torch.tensor([[nxt]], dtype=ids.dtype, device=ids.device)
    return torch.tensor(new, dtype=torch.long)


def check_request(tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float], samples: int) -> list[str]:
    """The checked task names (InputError naming the argument otherwise)."""
    names = [task_spec(t).name for t in tasks]
    if not names:
        raise InputError("--tasks: no task given")
    if int(samples) != samples or samples < 1:
        raise InputError(f"--samples must be an integer >= 1, got {samples}")
    if not lengths or any(int(n) != n or n < 2 for n in lengths):
        raise InputError(f"--lengths: lengths must be integers >= 2, got {list(lengths)}")
    if not depths or not all(0 <= d <= 1 for d in depths):
        raise InputError(f"--depths: depths must be in [0, 1], got {list(depths)}")
    return names


def ruler_grid(tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float], samples: int) -> list[tuple]:
    """Every (task, length, depth, sample index) to decode: one depth (None) for the tasks without one."""
    return [(t, int(n), d, i) for t in tasks for n in lengths for d in (depths if TASKS[t].has_depth else [None])
            for i in range(samples)]


def ruler_prompts(tokenizer, grid: Sequence[tuple], *, seed: int = DEFAULT_SEED, essay: list[str] | None = None) -> list[RulerPrompt]:
    """The prompts of `grid` items, each (task, length) fitted once and the fit reused as the next items' hint."""
    hints: dict[tuple[str, int], int] = {}
    out = []
    for task, length, depth, index in grid:
        p = build_prompt(tokenizer, task, length, depth, index, seed=seed, essay=essay, hint=hints.get((task, length)))
        hints[task, length] = p.haystack_units
        out.append(p)
    return out


def check_fillable(tokenizer, tasks: Sequence[str], lengths: Sequence[int], *, seed: int = DEFAULT_SEED,
                   essay: list[str] | None = None) -> None:
    """Refuse, before any decoding, a length some task cannot fill (sample 0 at depth 0.5 of each task and length)."""
    ruler_prompts(tokenizer, [(t, n, 0.5 if TASKS[t].has_depth else None, 0) for t in tasks for n in lengths],
                  seed=seed, essay=essay)


def essay_haystack(text: str | None = None) -> list[str]:
    """Words of the essay haystack: `text`, or the built-in corpus's evaluation split."""
    from .corpus import builtin_text

    return essay_words(builtin_text("evaluation") if text is None else text)


@torch.inference_mode()
def ruler_scores(model, tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float] = (0.0, 0.5, 1.0), *,
                 samples: int = 3, seed: int = DEFAULT_SEED, essay: list[str] | None = None, method: str = "none",
                 ext=None, progress: bool = True, group=None, check: bool = True) -> RulerResult:
    """RULER scores of `model` as it is set now (run inside `apply_method` and pass its Extension as `ext`, so hooked
    methods decode without a KV cache). `essay`: words of the essay haystack (default: the built-in evaluation split).
    check=False skips `check_fillable` (the caller did it)."""
    from residscope.runtime.distributed import gather_items, is_main, shard

    if model.tokenizer is None:
        raise InputError("RULER tasks need the model's tokenizer")
    names = check_request(tasks, lengths, depths, samples)
    if essay is None and any(TASKS[t].uses_essay for t in names):
        essay = essay_haystack()
    tok = model.tokenizer
    if check:
        check_fillable(tok, names, lengths, seed=seed, essay=essay)
    grid = ruler_grid(names, lengths, depths, samples)
    use_cache = ext.cache_safe if ext is not None else True
    mine = list(shard(list(range(len(grid))), group))
    answers: dict[int, tuple[str, int, list[str]]] = {}
    bar = tqdm(mine, desc=f"ruler {method}", disable=not progress or not is_main(group), leave=False)
    hints: dict[tuple[str, int], int] = {}
    for g in bar:
        task, length, depth, index = grid[g]
        p = build_prompt(tok, task, length, depth, index, seed=seed, essay=essay, hint=hints.get((task, length)))
        hints[task, length] = p.haystack_units
        ids = p.ids[None].to(model.device)  # [1, n_tokens]
        new = greedy_continuation(model, ids, p.max_new_tokens, use_cache=use_cache)  # [n_new]
        text = tok.decode(new.tolist(), skip_special_tokens=True)
        answers[g] = (postprocess_pred(text), int(ids.shape[1]), p.references)
    answers = gather_items(answers, group)
    cells = []
    for key in dict.fromkeys((t, n, d) for t, n, d, _ in grid):
        items = [g for g, item in enumerate(grid) if item[:3] == key]
        preds = [answers[g][0] for g in items]
        refs = [answers[g][2] for g in items]
        cells.append(RulerCell(task=key[0], length=key[1], depth=key[2], score=string_match_all(preds, refs),
                               n_samples=len(items), prompt_tokens=[answers[g][1] for g in items], predictions=preds,
                               references=refs))
    return RulerResult(method=method, factor=float(ext.factor) if ext is not None else 1.0, seed=seed, samples=samples,
                       cells=cells, settings=dict(ext.settings) if ext is not None else {})


def ruler_study(model, tasks: Sequence[str] | str | None, lengths: Sequence[int], depths: Sequence[float] = (0.0, 0.5, 1.0),
                *, samples: int = 3, seed: int = DEFAULT_SEED, method: str = "none", factor: float | None = None,
                window: int | None = None, method_kw: dict | None = None, haystack_text: str | None = None,
                haystack_source: str = "builtin:pydoc_data.topics/evaluation", progress: bool = True,
                group=None) -> RulerResult:
    """RULER scores under extension `method` (any name of `extension.METHODS`), the model extended once for the longest
    length as in `passkey_study` (factor None: max(lengths) / trained window, at least 1). `tasks`: names, a
    comma-separated string, or None / "all". `haystack_text`: the essay haystack (default: the built-in evaluation
    split), described in the result by `haystack_source`."""
    from .extension import METHODS, apply_method, extension_settings

    names = parse_tasks(tasks) if tasks is None or isinstance(tasks, str) else list(tasks)
    names = check_request(names, lengths, depths, samples)
    if method not in METHODS:
        raise InputError(f"--method: unknown method {method!r} (choose from {', '.join(METHODS)})")
    essay = essay_haystack(haystack_text) if any(TASKS[t].uses_essay for t in names) else None
    if model.tokenizer is None:
        raise InputError("RULER tasks need the model's tokenizer")
    check_fillable(model.tokenizer, names, lengths, seed=seed, essay=essay)  # before the extension's own set-up
    f, kw = extension_settings(model, method, lengths, factor=factor, window=window, method_kw=method_kw)
    with apply_method(model, method, f, **kw) as ext:
        result = ruler_scores(model, names, lengths, depths, samples=samples, seed=seed, essay=essay, method=method,
                              ext=ext, progress=progress, group=group, check=False)
    result.haystack = haystack_source if essay is not None else ""
    return result
