"""Model families as data: one file per `model_type`, each a `Family` (base.py) with its config reader and its
checkpoint names. Adding a family means adding a file here and its name to `_MODULES`; the decoder does not change
unless the family computes something no DecoderConfig field describes yet.

May import `residscope.model`'s config readers (`hf_config`), `errors`, `rope` and `common`; nothing imports a family
file directly except this registry.
"""

from __future__ import annotations

import importlib

from .base import Family, Packed, WeightMap, local_parts

_MODULES = ("llama", "mistral", "qwen2", "gemma3_text", "baichuan", "gpt2", "gpt_neox", "gptj", "gpt_neo", "opt", "bloom",
            "qwen3", "gemma", "gemma2", "phi3", "olmo2", "olmo3", "granite", "smollm3",
            "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "gpt_oss")

FAMILIES: dict[str, Family] = {}
for _name in _MODULES:
    _family = importlib.import_module(f".{_name}", __name__).FAMILY
    FAMILIES[_family.model_type] = _family


def family_of(model_type: str) -> Family:
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "Family", "Packed", "WeightMap", "family_of", "local_parts"]
