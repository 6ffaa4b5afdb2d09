"""residscope.model: the hookable decoder and its loaders."""

from .config import ConfigError, DecoderConfig
from .decoder import Decoder, KVCache
from .errors import CheckpointError
from .loading import load_config, load_model
from .rope import RopeParams

__all__ = ["CheckpointError", "ConfigError", "Decoder", "DecoderConfig", "KVCache", "RopeParams", "load_config", "load_model"]
