"""Shared fixtures: tiny random transformers checkpoints saved to disk, and the bundled real model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never reach a hub, and the GGUF conversion cache lives in a per-run folder unless the caller set one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def save_hf(model, tmp_path: Path, name: str = "ckpt", **kw) -> Path:
    """Save a transformers model (random weights) and return the folder."""
    folder = tmp_path / name
    model.save_pretrained(folder, **kw)
    return folder


def randomize_norms(model) -> None:
    """transformers initialises norm weights to constants; random ones make parity tests see the norm weights."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


def byte_tokenizer():
    """A 256-symbol byte-level tokenizer, so tiny random models (vocab >= 256) can read real text."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="session")
def real_model():
    """The bundled SmolLM2-135M (float32); skipped where it is not installed."""
    from residscope.model import load_model

    try:
        return load_model("smollm2-135m")
    except (FileNotFoundError, ImportError, ValueError) as e:
        pytest.skip(f"bundled model unavailable: {e}")
