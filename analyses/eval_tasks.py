"""Small offline evaluation tasks that pruning is known to break, generated with a seed (no downloaded data):

- `addition`: few-shot multi-digit addition, "a + b =" -> " a+b" (exact match of the generated line);
- `brackets`: close the open brackets of a random prefix of a balanced ()[]{} sequence, "( [ { } ->" -> " ] )"
  (exact match, whitespace-normalised);
- `cloze`: LAMBADA-style: the last word of a sentence in a held-out prose paragraph of the built-in evaluation split
  (`corpus.builtin_text`), kept only when that word occurs earlier in the paragraph (so the context can tell it),
  scored by log-likelihood:
  correct when every token of " word" is the model's greedy choice (lm-evaluation-harness's LAMBADA rule).

Each task is a list of records {"prompt" or "context", "target", ...}; the same records feed residscope's own scorer
(`residscope.analyses.evaluation`) and the lm-evaluation-harness task files (`residscope.analyses.lm_eval_tasks`).
"""

from __future__ import annotations

import random
import re

from residscope.model.errors import InputError

GENERATIVE = ("addition", "brackets")
LOGLIKELIHOOD = ("cloze",)
ITEM_TASKS = GENERATIVE + LOGLIKELIHOOD
_PAIRS = {"(": ")", "[": "]", "{": "}"}


def _check_n(n: int) -> None:
    if n < 1:
        raise InputError(f"--n must be >= 1 (items per task), got {n}")


def addition_items(n: int, seed: int = 0, *, digits: int = 3, shots: int = 4) -> list[dict]:
    """`n` few-shot prompts "a + b =" with `digits`-digit operands; the `shots` solved examples differ per item."""
    _check_n(n)
    if not 1 <= digits <= 12:
        raise InputError(f"digits must be in 1..12, got {digits}")
    rng = random.Random(f"addition-{seed}-{digits}")
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1

    def pair() -> tuple[int, int]:
        return rng.randint(lo, hi), rng.randint(lo, hi)

    items = []
    for _ in range(n):
        examples = [pair() for _ in range(shots)]
        a, b = pair()
        prompt = "".join(f"{x} + {y} = {x + y}\n" for x, y in examples) + f"{a} + {b} ="
        items.append({"prompt": prompt, "target": f" {a + b}", "a": a, "b": b})
    return items


def _open_prefix(rng: random.Random, length: int) -> tuple[list[str], list[str]]:
    """A random prefix of a balanced sequence with `length` symbols and at least one bracket left open; the stack."""
    seq, stack = [], []
    for i in range(length):
        must_open = not stack or (len(stack) < 2 and i == length - 1)
        if must_open or (rng.random() < 0.55 and len(stack) < length - i):
            b = rng.choice(list(_PAIRS))
            seq.append(b)
            stack.append(b)
        else:
            seq.append(_PAIRS[stack.pop()])
    return seq, stack


def brackets_items(n: int, seed: int = 0, *, length: int = 6, shots: int = 4) -> list[dict]:
    """`n` few-shot prompts "<open prefix> ->" whose target closes every open bracket, innermost first."""
    _check_n(n)
    if not 2 <= length <= 40:
        raise InputError(f"length must be in 2..40, got {length}")
    rng = random.Random(f"brackets-{seed}-{length}")

    def example() -> tuple[str, str]:
        seq, stack = _open_prefix(rng, length)
        return " ".join(seq), " ".join(_PAIRS[b] for b in reversed(stack))

    items = []
    for _ in range(n):
        shots_text = "".join(f"{s} -> {c}\n" for s, c in (example() for _ in range(shots)))
        seq, closing = example()
        items.append({"prompt": "Close every open bracket.\n" + shots_text + f"{seq} ->", "target": f" {closing}"})
    return items


_SENTENCE_END = re.compile(r"\s([A-Za-z]{4,})\.(?=\s|$)")  # a word of 4+ letters closing a sentence


def _prose_share(text: str) -> float:
    """Share of whitespace-separated words that are plain words once punctuation is stripped (code scores low)."""
    words = text.split()
    return sum(w.strip(".,;:()\"'*").isalpha() for w in words) / max(1, len(words))


def cloze_items(n: int | None = None, seed: int = 0, *, min_context_words: int = 15) -> list[dict]:
    """LAMBADA-style records {"context", "target"}: in each prose paragraph of the held-out evaluation split, every
    sentence whose last word (4+ letters) already occurred in the paragraph before it, with the paragraph up to that
    word as context (64 records on CPython 3.11). `n=None` takes all of them, else a seeded sample of `n`."""
    from .corpus import builtin_text

    items = []
    for para in builtin_text("evaluation").split("\n\n"):
        text = " ".join(para.split())  # pydoc's line breaks and indentation are layout, not content
        if _prose_share(text) < 0.7:
            continue
        for m in _SENTENCE_END.finditer(text):
            context, word = text[:m.start()], m.group(1)
            if len(context.split()) >= min_context_words and word.lower() in context.lower():
                items.append({"context": context, "target": f" {word}"})
    if n is not None:
        _check_n(n)
        if n > len(items):
            raise InputError(f"--n {n}: the evaluation split has {len(items)} cloze sentences")
        items = random.Random(f"cloze-{seed}").sample(items, n)
    return items


def task_items(task: str, n: int, seed: int = 0) -> list[dict]:
    """The records of one item task (addition, brackets, cloze)."""
    if task == "addition":
        return addition_items(n, seed)
    if task == "brackets":
        return brackets_items(n, seed)
    if task == "cloze":
        return cloze_items(n, seed)
    raise InputError(f"unknown task {task!r} (item tasks: {', '.join(ITEM_TASKS)})")


def exact_match(prediction: str, target: str) -> bool:
    """The first generated line against the target, whitespace ignored (lm-eval's exact_match with
    regexes_to_ignore ["\\s+"], so both harnesses score alike)."""
    first = prediction.split("\n", 1)[0]
    return "".join(first.split()) == "".join(target.split())
