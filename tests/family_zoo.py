"""Tiny random transformers models of every family residscope loads, for the parity and toolkit tests.

`CASES`: case id -> factory() returning an eval-mode transformers CausalLM with random weights (norm weights random
too, so parity sees them). Each family group keeps its cases in its own file (family_cases_*.py); this module merges
them, so tests/test_families.py runs every analysis on every case.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

VOCAB = 97


def randomize(model, seed: int = 1):
    """Norm weights and biases random (transformers initialises them to constants) and every bias non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=gen) * (0.5 if name.endswith("bias") else 1.0) + (0.0 if name.endswith("bias") else 0.5))
    return model.eval()


def build(config_cls, model_cls, seed: int = 0, **kw) -> Callable:
    def factory():
        torch.manual_seed(seed)
        return randomize(model_cls(config_cls(**kw)))
    return factory


CASES: dict[str, Callable] = {}
for _module in ("family_cases_base", "family_cases_rms", "family_cases_gpt", "family_cases_moe"):
    try:
        CASES.update(importlib.import_module(_module).CASES)
    except ModuleNotFoundError as e:
        if e.name != _module:
            raise
