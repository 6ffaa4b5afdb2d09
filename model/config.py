"""DecoderConfig: one normalised description of every decoder residscope runs.

`DecoderConfig.from_hf(config_dict)` reads a transformers `config.json` (llama, mistral, qwen2, gemma3_text, baichuan)
and refuses what it cannot reproduce exactly. Derived quantities are properties, never stored twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .hf_config import FULL, SLIDING, SUBLAYER_KEY, decoder_kwargs
from .rope import RopeParams

__all__ = ["FULL", "SLIDING", "SUBLAYER_KEY", "ConfigError", "DecoderConfig"]


@dataclass
class DecoderConfig:
    model_type: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    act: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    norm_offset: float = 0.0  # 1.0 for Gemma's (1 + w) RMSNorm
    embed_scale: float | None = None  # Gemma multiplies embeddings by sqrt(d_model)
    qk_norm: bool = False  # Gemma 3 RMS-normalises q and k per head
    post_norms: bool = False  # Gemma 3 normalises attention and MLP outputs before the residual add
    norm_head: bool = False  # Baichuan 2 L2-normalises every row of lm_head
    positional: str = "rope"  # "rope", "alibi" or "none"
    rope: dict[str, RopeParams] = field(default_factory=dict)  # per layer type (FULL / SLIDING)
    layer_types: list[str] = field(default_factory=list)  # FULL or SLIDING per layer
    sliding_window: int | None = None
    attn_scale: float | None = None  # None: 1/sqrt(d_head)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    max_position_embeddings: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    removed_attn: tuple[int, ...] = ()  # blocks built without attention (sub-block surgery), current numbering
    removed_mlp: tuple[int, ...] = ()  # blocks built without an MLP
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)  # the source config.json, for export

    def __post_init__(self):
        if not self.layer_types:
            self.layer_types = [FULL] * self.n_layers
        if len(self.layer_types) != self.n_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"num_attention_heads {self.n_heads} is not a multiple of num_key_value_heads {self.n_kv_heads}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding_attention layers need a sliding_window")
        if self.act not in ("silu", "gelu_tanh"):
            raise ConfigError(f"unsupported activation {self.act!r}")
        if self.positional not in ("rope", "alibi", "none"):
            raise ConfigError(f"unsupported position embedding {self.positional!r}")
        for name in ("removed_attn", "removed_mlp"):
            layers = tuple(getattr(self, name))
            if any(not 0 <= i < self.n_layers for i in layers) or len(set(layers)) != len(layers):
                raise ConfigError(f"{name} {list(layers)} must name distinct layers in 0..{self.n_layers - 1}")
            setattr(self, name, tuple(sorted(layers)))
        if self.positional == "rope":
            missing = {t for t in self.layer_types if t not in self.rope}
            if missing:
                raise ConfigError(f"no RoPE parameters for layer types {sorted(missing)}")

    # ---- derived -----------------------------------------------------------------------------
    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.n_heads // self.n_kv_heads

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else 1.0 / math.sqrt(self.d_head)

    def has_attn(self, layer: int) -> bool:
        return layer not in self.removed_attn

    def has_mlp(self, layer: int) -> bool:
        return layer not in self.removed_mlp

    def window_of(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def rope_of(self, layer: int) -> RopeParams | None:
        return self.rope.get(self.layer_types[layer]) if self.positional == "rope" else None

    # ---- (de)serialisation -------------------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict[str, Any], *, source: str = "config.json", position_embedding: str | None = None) -> "DecoderConfig":
        """Normalise a transformers config dict (`hf_config.decoder_kwargs`). `source` names the file in error messages."""
        kwargs = decoder_kwargs(cfg, source=source, position_embedding=position_embedding)
        try:
            return cls(**kwargs)
        except (TypeError, KeyError) as e:  # a value of the wrong kind, e.g. layer_types not a list
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path, **kw) -> "DecoderConfig":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: missing config.json") from None
        except OSError as e:  # permission denied, a folder named config.json, ...
            raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(cfg, source=str(path), **kw)

    def replace(self, **changes) -> "DecoderConfig":
        return dataclasses.replace(self, **changes)
