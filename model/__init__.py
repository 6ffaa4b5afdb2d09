"""residscope.model: the hookable decoder and its loaders.

The config (`config`, normalised from Hugging Face configs by `hf_config`), RoPE (`rope`), the `Decoder` with its hook
points and positional knobs (`decoder`), checkpoint reading and writing (`loading`, `checkpoint`, `safetensors_io`,
`gguf`, `sp_tokenizer`), the model aliases (`registry`) and the shipped zoo checkpoints (`zoo/`).
May import `residscope.common` only; every other residscope package imports this one.
"""

from .config import ConfigError, DecoderConfig
from .decoder import Decoder, KVCache
from .errors import CheckpointError
from .loading import load_config, load_model
from .rope import RopeParams

__all__ = ["CheckpointError", "ConfigError", "Decoder", "DecoderConfig", "KVCache", "RopeParams", "load_config", "load_model"]
