"""Passkey prompts (Mohtashami & Jaggi; the PI paper's version; RESEARCH.md section 5): one text for training the zoo
and for evaluating retrieval, so the two cannot drift apart.

A document is an intro, filler sentences with the key sentence among them, and the question. Training documents end
with the answer (`answer=True`); evaluation prompts stop after the question, and the model must produce the key.
"""

from __future__ import annotations

import random

import torch

from residscope.model.errors import InputError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
QUESTION = "What is the pass key? The pass key is"


def passkey_document(key: str, n_before: int, n_after: int, *, answer: bool = False) -> str:
    """Intro, `n_before` filler sentences, the key sentence, `n_after` filler sentences, the question (and the key)."""
    ending = f"{QUESTION} {key}." if answer else QUESTION
    return " ".join([INTRO, *[FILLER] * n_before, f"The pass key is {key}. Remember it. {key} is the pass key.",
                     *[FILLER] * n_after, ending])


def passkey_text(key: str, n_filler: int, depth: float) -> str:
    """The evaluation prompt: `n_filler` filler sentences with the key sentence after round(depth * n_filler) of them."""
    if not 0 <= depth <= 1:
        raise InputError(f"depth must be in [0, 1], got {depth}")
    before = round(depth * n_filler)
    return passkey_document(key, before, n_filler - before)


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> torch.Tensor:
    """Token ids [n] of the longest prompt with at most `length` tokens (special tokens included)."""
    def size(n: int) -> int:
        return len(tokenizer(passkey_text(key, n, depth))["input_ids"])

    if size(0) > length:
        raise InputError(f"length {length} is too short for a passkey prompt ({size(0)} tokens without filler)")
    per = max(1, size(1) - size(0))
    n = max(0, (length - size(0)) // per)
    while n > 0 and size(n) > length:
        n -= 1
    while size(n + 1) <= length:
        n += 1
    return torch.tensor(tokenizer(passkey_text(key, n, depth))["input_ids"], dtype=torch.long)


def passkey_keys(n_keys: int, seed: int = 1234, digits: int = 5) -> list[str]:
    """`n_keys` random keys of `digits` digits (evaluation uses another seed than the zoo's training data)."""
    rng = random.Random(seed)
    return [str(rng.randint(10 ** (digits - 1), 10 ** digits - 1)) for _ in range(n_keys)]
