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


@pytest.fixture
def hf_norms_in_float64(monkeypatch):
    """transformers' RMSNorms round through float32 even in a float64 model; residscope's float64 models normalise in
    float64 (so decompositions of them are exact to 1e-9). Float64 parity tests compare with a transformers whose norms
    do the same; in float32 and below these forwards compute exactly what transformers' own do."""
    from transformers.models.gemma3 import modeling_gemma3
    from transformers.models.llama import modeling_llama

    def rms(x, eps):
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        return wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)

    def llama(self, x):
        return self.weight * rms(x, self.variance_epsilon).to(x.dtype)

    def gemma(self, x):
        normed = rms(x, self.eps)
        return (normed * (1.0 + self.weight.to(normed.dtype))).type_as(x)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", llama)
    monkeypatch.setattr(modeling_gemma3.Gemma3RMSNorm, "forward", gemma)
    # mixture-of-experts families (family_cases_moe.py): their RMSNorms, and routers whose softmax is float32 in
    # transformers even for float64 models (residscope's runs in float64 there)
    import importlib

    def router(self, x):
        logits = torch.nn.functional.linear(x.reshape(-1, self.hidden_dim), self.weight, getattr(self, "bias", None))
        probs = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        top, idx = probs.topk(self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):
            top = top / top.sum(-1, keepdim=True)
        return logits, top.to(logits.dtype), idx

    for family, prefix in (("qwen2_moe", "Qwen2Moe"), ("qwen3_moe", "Qwen3Moe"), ("mixtral", "Mixtral"),
                           ("olmoe", "Olmoe")):
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        monkeypatch.setattr(getattr(module, f"{prefix}RMSNorm"), "forward", llama)
        monkeypatch.setattr(getattr(module, f"{prefix}TopKRouter"), "forward", router)
