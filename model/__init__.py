"""residscope.model: the hookable decoder and its loaders.

The config (`config`, normalised from Hugging Face configs by `hf_config`), RoPE (`rope`), the `Decoder` with its hook
points and positional knobs (`decoder`), checkpoint reading and writing (`loading`, `checkpoint`, `safetensors_io`,
`gguf`, `sp_tokenizer`), the model aliases (`registry`) and the shipped zoo checkpoints (`zoo/`).
May import `residscope.common` only; every other residscope package imports this one.

The names below load on first use (PEP 562), so `from residscope.model.errors import InputError` in the CLI does not
pull in torch and transformers before a command runs.
"""

import importlib

_EXPORTS = {"CheckpointError": ".errors", "ConfigError": ".errors", "Decoder": ".decoder", "DecoderConfig": ".config",
            "InputError": ".errors", "KVCache": ".decoder", "MissingFileError": ".errors", "RopeParams": ".rope",
            "load_config": ".loading", "load_model": ".loading"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
