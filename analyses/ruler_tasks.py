"""RULER's synthetic tasks that need no downloaded data (Hsieh et al. 2024; NVIDIA/RULER scripts/data/synthetic,
RESEARCH.md section 9): prompts of a requested token length for one tokenizer, seeded, with the needle depth controlled.

    niah_single_1     noise haystack, word key, 7-digit value
    niah_single_2     essay haystack, word key, 7-digit value
    niah_single_3     essay haystack, word key, UUID value
    niah_multikey_1   essay haystack, 4 keys (3 distractor needles), one asked
    niah_multikey_2   haystack made of needles (every sentence a distractor), word keys, 7-digit values
    niah_multikey_3   haystack made of needles, UUID keys and values
    niah_multivalue   essay haystack, 4 values for one key, all asked
    niah_multiquery   essay haystack, 4 keys, all asked
    vt                variable tracking: a 5-variable chain (4 hops) in the noise haystack, after an in-context example
    cwe               common-words extraction: numbered word list, the 10 words repeated most, after one example
    fwe               frequent-words extraction: Zipf(2)-distributed coded words, the 3 most frequent

Templates, needle ("One of the special magic {numbers} for {key} is: {value}."), answer prefixes, generation budgets
(128/30/120/50 tokens), the singular rewording of one-answer needle prompts, the in-context examples of vt and cwe, and
fwe's vocabulary rule follow RULER's scripts at commit c3f5e3b. Differences, all deliberate:
- the essay haystack is the built-in corpus's evaluation split (or a text the caller passes), not Paul Graham's essays;
  a length it cannot fill is refused instead of repeating the text; sentences are split with a regex, not nltk;
- keys and cwe words come from the fixed lists in `ruler_words.py`, not from the `wonderwords` package;
- depth is a parameter: the first answer needle (vt: the chain's first assignment) sits after `depth` of the haystack;
  the other needles (distractors, further values, further queried keys; vt's later hops) sit at seeded random depths of
  RULER's 40-point grid (vt: uniformly after the first), as RULER places all of them; cwe and fwe have no depth;
- randomness comes from one `random.Random` per (seed, task, sample index), so a sample's keys, values and words are the
  same at every length and depth: only the haystack size and the needle position change.

Length: as in RULER, a prompt plus the task's generation budget fits in the requested length (tokens as the model's
tokenizer counts them, special tokens included). The haystack grows in RULER's units (a noise paragraph, an essay word, a
distinct cwe word, one fwe word draw, a needle sentence) to the largest size that fits, so a prompt falls short of
length - budget by less than one unit's tokens (a few to ~50).
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from residscope.common.errors import InputError

from .ruler_words import ADJECTIVES, NOUNS, VERBS

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTH_GRID = tuple(round(100 * i / 39) for i in range(40))  # RULER's np.round(np.linspace(0, 100, 40)), in percent
KEY_WORDS = tuple(f"{a}-{n}" for a in ADJECTIVES for n in NOUNS)  # RULER's adjective-noun keys
CWE_WORDS = tuple(sorted(set(NOUNS) | set(ADJECTIVES) | set(VERBS)))

# RULER's scripts/data/synthetic/constants.py: (template, answer prefix, tokens to generate)
TEMPLATES = {
    "niah": ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will "
             "quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} "
             "for {query} mentioned in the provided text?",
             " The special magic {type_needle_v} for {query} mentioned in the provided text are", 128),
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: "
           "Find all variables that are assigned the value {query} in the text above.",
           " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
           "the value {query}, they are: ", 30),
    "cwe": ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
            "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
            " Answer: The top 10 words that appear most often in the list are:", 120),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find the three most frequently "
            "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
            "What are the three most frequently appeared words in the above coded text?",
            " Answer: According to the coded text above, the three most frequently appeared words are:", 50),
}


@dataclass(frozen=True)
class TaskSpec:
    """One of RULER's synthetic tasks (scripts/synthetic.yaml)."""

    name: str
    kind: str  # niah, vt, cwe, fwe
    haystack: str = "noise"  # niah: noise, essay or needle
    keys: str = "words"  # niah: words or uuids
    values: str = "numbers"  # niah: numbers or uuids
    n_keys: int = 1
    n_values: int = 1
    n_queries: int = 1

    @property
    def max_new_tokens(self) -> int:
        return TEMPLATES[self.kind][2]

    @property
    def has_depth(self) -> bool:
        """Whether the task hides something at a depth (the needle tasks and vt; cwe and fwe spread their answer)."""
        return self.kind in ("niah", "vt")

    @property
    def uses_essay(self) -> bool:
        return self.haystack == "essay"


TASKS = {t.name: t for t in (
    TaskSpec("niah_single_1", "niah", "noise"),
    TaskSpec("niah_single_2", "niah", "essay"),
    TaskSpec("niah_single_3", "niah", "essay", values="uuids"),
    TaskSpec("niah_multikey_1", "niah", "essay", n_keys=4),
    TaskSpec("niah_multikey_2", "niah", "needle"),
    TaskSpec("niah_multikey_3", "niah", "needle", keys="uuids", values="uuids"),
    TaskSpec("niah_multivalue", "niah", "essay", n_values=4),
    TaskSpec("niah_multiquery", "niah", "essay", n_keys=4, n_queries=4),
    TaskSpec("vt", "vt"),
    TaskSpec("cwe", "cwe"),
    TaskSpec("fwe", "fwe"),
)}


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise InputError(f"--tasks: unknown task {name!r} (choose from {', '.join(TASKS)}, or all)")
    return TASKS[name]


def parse_tasks(spec: str | None) -> list[str]:
    """Comma-separated task names, or "all" / None for every task; each name checked, order kept, duplicates dropped."""
    if spec is None or spec.strip() in ("", "all"):
        return list(TASKS)
    names = [t.strip() for t in spec.split(",") if t.strip()]
    return list(dict.fromkeys(task_spec(n).name for n in names))


@dataclass
class RulerPrompt:
    """One sample: the text the model reads (input and answer prefix, as RULER sends it) and the reference strings."""

    task: str
    length: int  # requested: prompt tokens + max_new_tokens <= length
    depth: float | None
    index: int
    text: str
    references: list[str]
    ids: torch.Tensor  # [n_tokens] as the tokenizer encodes `text`, special tokens included
    max_new_tokens: int
    haystack_units: int  # noise paragraphs, essay words, needle sentences, cwe words or fwe draws
    needles: list[str] = field(default_factory=list)  # niah: every needle sentence; vt: the chain's statements


# ---------------------------------------------------------------------------------------------------------------------
# random draws (RULER's generate_random_*)
# ---------------------------------------------------------------------------------------------------------------------
def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _draw(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return _number(rng)
    if kind == "uuids":
        return _uuid(rng)
    return rng.choice(KEY_WORDS)


def sample_rng(seed: int, task: str, index: int) -> random.Random:
    """The random source of one sample: the same at every length and depth (str seeds are hashed with sha512, so this
    does not depend on PYTHONHASHSEED)."""
    return random.Random(f"ruler:{seed}:{task}:{index}")


def split_sentences(text: str) -> list[str]:
    """Sentences of whitespace-normalised text: split after ., ! or ? followed by a space (nltk's punkt without its
    abbreviation list)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def essay_words(text: str) -> list[str]:
    """RULER's essay haystack: the text's words, whitespace collapsed (the haystack grows word by word)."""
    return re.sub(r"\s+", " ", text).strip().split(" ")


def _insert_at_depths(units: list[str], items: list[tuple[float, str]]) -> list[str]:
    """`units` with each (depth, item) inserted before unit round(depth * len(units)); ties keep the items' order."""
    out = list(units)
    slots = sorted(((round(d * len(units)), i, item) for i, (d, item) in enumerate(items)), reverse=True)
    for pos, _, item in slots:
        out.insert(pos, item)
    return out


def _needle_depths(rng: random.Random, depth: float, n: int) -> list[float]:
    """The requested depth for the first needle, seeded draws of RULER's grid (without replacement) for the others."""
    return [depth] + [d / 100 for d in rng.sample(DEPTH_GRID, n - 1)]


# ---------------------------------------------------------------------------------------------------------------------
# the four task families: build(n_units) -> (text, references, needles)
# ---------------------------------------------------------------------------------------------------------------------
Builder = Callable[[int], tuple[str, list[str], list[str]]]


def _singular(template: str, spec: TaskSpec) -> tuple[str, str]:
    """RULER's rewording of a one-answer needle prompt ("A special magic number is hidden ...")."""
    type_v = spec.values
    if spec.n_queries * spec.n_values == 1:
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(old, new)
        type_v = type_v[:-1]
    return template, type_v


def niah_builder(spec: TaskSpec, seed: int, index: int, depth: float, essay: list[str] | None) -> Builder:
    template, type_v = _singular("".join(TEMPLATES["niah"][:2]), spec)
    n_keys = max(spec.n_keys, spec.n_queries)

    def build(n: int):
        rng = sample_rng(seed, spec.name, index)
        keys, values = [], []
        for _ in range(n_keys):
            keys.append(_draw(rng, spec.keys))
            values.append([_draw(rng, spec.values) for _ in range(spec.n_values)])
        queried = rng.sample(range(n_keys), spec.n_queries)
        # the first answer needle goes to `depth`; every other needle to a random grid depth
        order = [(queried[0], 0)] + [(k, v) for k in range(n_keys) for v in range(spec.n_values) if (k, v) != (queried[0], 0)]
        needles = [NEEDLE.format(type_needle_v=spec.values, key=keys[k], value=values[k][v]) for k, v in order]
        placed = list(zip(_needle_depths(rng, depth, len(needles)), needles))
        if spec.haystack == "essay":
            sentences = _insert_at_depths(split_sentences(" ".join(essay[:n])), placed)
            context = " ".join(sentences)
        else:
            units = [NOISE] * n if spec.haystack == "noise" else [
                NEEDLE.format(type_needle_v=spec.values, key=_draw(rng, spec.keys), value=_draw(rng, spec.values))
                for _ in range(n)]
            context = "\n".join(_insert_at_depths(units, placed))
        queries = [keys[i] for i in queried]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        text = template.format(type_needle_v=type_v, context=context, query=query)
        return text, [a for i in queried for a in values[i]], needles

    return build


def _vt_chain(rng: random.Random, n_hops: int, letters: int) -> tuple[list[str], list[str], str]:
    """(variables, statements, value): "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE ", ... (RULER's trailing space kept)."""
    names: list[str] = []
    while len(names) < n_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names and name != "VAR":
            names.append(name)
    value = str(rng.randint(10000, 99998))  # np.random.randint(10000, 99999)
    statements = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(n_hops)]
    return names, statements, value


def _vt_text(statements: list[str], value: str, n_noise: int, first: float, later: list[float]) -> str:
    """The vt prompt (template + answer prefix) with the chain in n_noise noise paragraphs: the first statement after
    round(first * n_noise) of them, statement j after `later[j-1]` of the rest (in order)."""
    start = round(first * n_noise)
    positions = [start] + sorted(start + math.floor(u * (n_noise - start + 1)) for u in later)
    sentences = [NOISE] * n_noise
    for j, (pos, s) in enumerate(zip(positions, statements)):
        sentences.insert(pos + j, s)
    context = "\n".join(sentences).replace(". \n", ".\n")
    return "".join(TEMPLATES["vt"][:2]).format(context=context, query=value, num_v=len(statements))


N_HOPS = 4


def vt_example(tokenizer, seed: int, index: int, limit: int = 500) -> str:
    """RULER's in-context example of vt: a 3-letter chain in as much noise as fits in `limit` tokens, then its answer."""
    rng = random.Random(f"ruler:{seed}:vt-example:{index}")
    names, statements, value = _vt_chain(rng, N_HOPS, 3)
    first, later = rng.random(), [rng.random() for _ in range(N_HOPS)]
    n = fit_units(lambda k: _vt_text(statements, value, k, first, later), tokenizer, limit, 1, None,
                  task="vt (example)", length=limit)[0]
    return _vt_text(statements, value, n, first, later) + " " + " ".join(names) + "\n"


def vt_builder(spec: TaskSpec, seed: int, index: int, depth: float, example: str) -> Builder:
    def build(n: int):
        rng = sample_rng(seed, spec.name, index)
        names, statements, value = _vt_chain(rng, N_HOPS, 5)
        later = [rng.random() for _ in range(N_HOPS)]
        return example + "\n" + _vt_text(statements, value, n, depth, later), names, statements

    return build


def _cwe_example(rng: random.Random, n_words: int, common_repeats: int, uncommon_repeats: int, n_common: int = 10):
    """A numbered list of `n_words` distinct words: the first `n_common` repeated `common_repeats` times, the rest
    `uncommon_repeats` times, shuffled; and the common words."""
    words = rng.sample(CWE_WORDS, n_words)
    common, uncommon = words[:n_common], words[n_common:]
    listed = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), common


def cwe_builder(spec: TaskSpec, seed: int, index: int, length: int) -> Builder:
    template = "".join(TEMPLATES["cwe"][:2])
    # RULER: below 4096 tokens, 6 and 1 repeats (example: 20 words, 3 and 1); else 30 and 3 (example: 40 words, 10 and 3)
    short = length < 4096
    example_args, main_args = ((20, 3, 1), (6, 1)) if short else ((40, 10, 3), (30, 3))

    def build(n: int):
        rng = sample_rng(seed, spec.name, index)
        context, answer = _cwe_example(rng, *example_args)
        example = template.format(context=context) + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(answer))
        context, common = _cwe_example(rng, n, *main_args)
        return example + "\n" + template.format(context=context), common, []

    return build


def fwe_vocabulary(rng: random.Random, size: int, letters: int = 6) -> list[str]:
    """RULER's coded words: `size` distinct random lowercase words, shuffled, the first replaced by '...' (noise)."""
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=letters)))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."
    return words


ZETA_2 = math.pi ** 2 / 6  # zeta(alpha) at RULER's alpha = 2


def fwe_counts(n: int, size: int, alpha: float = 2.0) -> list[int]:
    """How often the word of rank k appears among `n` draws: int(n k^-alpha / zeta(alpha)) (RULER's rule)."""
    return [int(n * k ** -alpha / ZETA_2) for k in range(1, size + 1)]


def fwe_builder(spec: TaskSpec, seed: int, index: int, length: int) -> Builder:
    template = "".join(TEMPLATES["fwe"][:2])
    size = max(5, (length - spec.max_new_tokens) // 50)  # RULER's vocab_size = (max_seq_length - budget) // 50

    def build(n: int):
        rng = sample_rng(seed, spec.name, index)
        vocab = fwe_vocabulary(rng, size)
        drawn = [w for w, c in zip(vocab, fwe_counts(n, size)) for _ in range(c)]
        rng.shuffle(drawn)
        return template.format(context=" ".join(drawn)), vocab[1:4], []

    return build


def fwe_min_draws(size: int) -> int:
    """The fewest draws at which the three answers each appear, more often than every other coded word."""
    n = 1
    while True:
        c = fwe_counts(n, size)
        if min(c[1:4]) > max(c[4:], default=0):
            return n
        n += 1


# ---------------------------------------------------------------------------------------------------------------------
# filling a length
# ---------------------------------------------------------------------------------------------------------------------
def n_tokens(tokenizer, text: str) -> int:
    """Tokens the model reads for `text` (special tokens the tokenizer adds included, as `passkey_prompt` counts)."""
    return len(tokenizer(text)["input_ids"])


def fit_units(make_text: Callable[[int], str], tokenizer, limit: int, n_min: int, n_max: int | None, *, task: str,
              length: int, hint: int | None = None, what: str = "haystack") -> tuple[int, int]:
    """(n, tokens): the largest n in [n_min, n_max] whose text has at most `limit` tokens (tokens grow with n).

    InputError naming the length when even n_min is too long, or when n_max (the whole haystack) is not enough to fill
    it. `hint`: a size near the answer (the same task at another depth or sample), to gallop from."""
    def size(n: int) -> int:
        return n_tokens(tokenizer, make_text(n))

    smallest = size(n_min)
    if smallest > limit:
        raise InputError(f"--lengths: {length} is too short for task {task}: its template, needles or example, smallest "
                         f"haystack and generation budget need {smallest + length - limit} tokens")
    if n_max is not None:
        whole = size(n_max)
        if whole <= limit:
            raise InputError(f"--lengths: {length} is too long for task {task}: the whole {what} ({n_max} units) makes "
                             f"only {whole + length - limit} tokens")
    lo, lo_size = n_min, smallest  # the largest size known to fit
    hi = n_max  # the smallest size known not to fit (None: not known yet)
    if hint is None or hint <= n_min:
        probe = n_min + 16 if n_max is None else min(n_min + 16, n_max)  # a first guess from 16 more units
        per = max(1e-3, (size(probe) - smallest) / max(1, probe - n_min))
        hint = n_min + max(1, int((limit - smallest) / per))
    guess = hint if hi is None else min(hint, hi - 1)
    step = max(1, guess // 64)
    if guess > lo:
        s = size(guess)
        if s <= limit:  # gallop up until a size does not fit
            lo, lo_size = guess, s
            while hi is None or lo + step < hi:
                s = size(lo + step)
                if s > limit:
                    hi = lo + step
                    break
                lo, lo_size = lo + step, s
                step *= 2
        else:  # gallop down until a size fits
            hi = guess
            while hi - step > lo:
                s = size(hi - step)
                if s <= limit:
                    lo, lo_size = hi - step, s
                    break
                hi -= step
                step *= 2
    while hi is not None and hi - lo > 1:  # binary search in (lo, hi)
        mid = (lo + hi) // 2
        s = size(mid)
        if s <= limit:
            lo, lo_size = mid, s
        else:
            hi = mid
    return lo, lo_size


def build_prompt(tokenizer, task: str, length: int, depth: float | None, index: int, *, seed: int = 42,
                 essay: list[str] | None = None, hint: int | None = None) -> RulerPrompt:
    """Sample `index` of `task` at `length` tokens (prompt + generation budget) with its needle at `depth` in [0, 1]
    (None for cwe and fwe). `essay`: the essay haystack's words (`essay_words`), needed by the essay tasks."""
    spec = task_spec(task)
    if spec.has_depth:
        if depth is None or not 0 <= depth <= 1:
            raise InputError(f"--depths: depth must be in [0, 1] for task {task}, got {depth}")
    else:
        depth = None
    limit = length - spec.max_new_tokens
    n_min, n_max, what = 1, None, "haystack"
    if spec.kind == "niah":
        if spec.uses_essay:
            if not essay:
                raise InputError(f"task {task} needs an essay haystack (essay_words of a text)")
            n_max, what = len(essay), "essay haystack"
        build = niah_builder(spec, seed, index, depth, essay)
    elif spec.kind == "vt":
        build = vt_builder(spec, seed, index, depth, vt_example(tokenizer, seed, index))
    elif spec.kind == "cwe":
        n_min, n_max, what = 10, len(CWE_WORDS), "built-in word list"
        build = cwe_builder(spec, seed, index, length)
    else:
        build = fwe_builder(spec, seed, index, length)
        n_min = fwe_min_draws(max(5, limit // 50))
    n, count = fit_units(lambda k: build(k)[0], tokenizer, limit, n_min, n_max, task=task, length=length, hint=hint,
                         what=what)
    text, refs, needles = build(n)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)  # [n_tokens]
    return RulerPrompt(task=task, length=int(length), depth=depth, index=index, text=text, references=list(refs), ids=ids,
                       max_new_tokens=spec.max_new_tokens, haystack_units=n, needles=needles)
