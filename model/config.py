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

import torch

from .errors import ConfigError
from .hf_config import FULL, SLIDING, decoder_kwargs
from .rope import RopeParams

# TransformerLens's `original_architecture` per model_type (the class name in config.json's "architectures")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM", "baichuan": "BaichuanForCausalLM"}
# families whose checkpoints were trained without a BOS token in front (TransformerLens's default_prepend_bos=False)
NO_BOS_FAMILIES = ("qwen2",)


@dataclass
class LiveState:
    """What a config cannot know from config.json: where the model's weights are now and how its tokenizer behaves.

    The owning Decoder rewrites it after every `.to(...)` and whenever its tokenizer or config is replaced, so the
    TransformerLens fields read from it (`cfg.device`, `cfg.dtype`, `cfg.tokenizer_prepends_bos`, ...) stay true.
    """

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    model_name: str | None = None
    tokenizer_prepends_bos: bool = False
    tokenizer_appends_eos: bool = False
    prepend_bos: bool | None = None  # the user's `cfg.default_prepend_bos = ...`; None: decided by the model family


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
    # TransformerLens opt-in switches (set through Decoder.set_use_attn_result & co.); off costs nothing
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_hook_tokens: bool = False
    use_attn_in: bool = False
    seed: int | None = None
    live: LiveState = field(default_factory=LiveState, init=False, repr=False, compare=False)

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

    # ---- TransformerLens field names (read-only, true for this model; TL's ActivationCache, patching and
    # head_detector read them through `model.cfg`) ---------------------------------------------------------------
    @property
    def n_ctx(self) -> int | None:
        """Longest context the checkpoint was configured for (Baichuan 13B names it model_max_length)."""
        return self.max_position_embeddings or self.hf_config.get("model_max_length")

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    @property
    def n_key_value_heads(self) -> int:
        return self.n_kv_heads

    @property
    def act_fn(self) -> str:
        return "silu" if self.act == "silu" else "gelu_pytorch_tanh"

    @property
    def normalization_type(self) -> str:
        return "RMS"

    @property
    def uses_rms_norm(self) -> bool:
        return True

    @property
    def final_rms(self) -> bool:
        return True

    @property
    def eps(self) -> float:
        return self.norm_eps

    @property
    def gated_mlp(self) -> bool:
        return True

    @property
    def attn_only(self) -> bool:
        """True when sub-block surgery removed every MLP."""
        return self.n_layers > 0 and len(self.removed_mlp) == self.n_layers

    @property
    def positional_embedding_type(self) -> str:
        return {"rope": "rotary", "alibi": "alibi", "none": "none"}[self.positional]

    @property
    def rotary_base(self) -> float | None:
        """RoPE theta of the global (full-attention) layers; Gemma 3's local layers have their own (`rope[SLIDING]`)."""
        params = self.rope.get(FULL) or next(iter(self.rope.values()), None)
        return params.theta if params is not None else None

    @property
    def rotary_dim(self) -> int | None:
        params = self.rope.get(FULL) or next(iter(self.rope.values()), None)
        return int(self.d_head * params.partial_rotary_factor) if params is not None else None

    @property
    def rotary_adjacent_pairs(self) -> bool:
        return False  # rotate_half layout: dimension i pairs with i + rotary_dim / 2

    @property
    def use_local_attn(self) -> bool:
        return SLIDING in self.layer_types

    @property
    def window_size(self) -> int | None:
        return self.sliding_window

    @property
    def attn_types(self) -> list[str]:
        return ["local" if t == SLIDING else "global" for t in self.layer_types]

    @property
    def use_normalization_before_and_after(self) -> bool:
        return self.post_norms

    @property
    def attn_scores_soft_cap(self) -> float:
        return self.attn_softcap if self.attn_softcap is not None else -1.0

    @property
    def output_logits_soft_cap(self) -> float:
        return self.final_softcap if self.final_softcap is not None else -1.0

    @property
    def parallel_attn_mlp(self) -> bool:
        return False

    @property
    def layer_norm_folding(self) -> bool:
        return False  # residscope never folds norms into weights

    @property
    def num_experts(self) -> None:
        return None

    @property
    def experts_per_token(self) -> None:
        return None

    @property
    def n_devices(self) -> int:
        return 1

    @property
    def original_architecture(self) -> str:
        names = self.hf_config.get("architectures") or [ARCHITECTURES[self.model_type]]
        return names[0]

    @property
    def model_name(self) -> str:
        return self.live.model_name or self.hf_config.get("_name_or_path") or self.model_type

    @property
    def tokenizer_name(self) -> str:
        return self.model_name

    @property
    def device(self) -> torch.device:
        return self.live.device

    @property
    def dtype(self) -> torch.dtype:
        return self.live.dtype

    @property
    def tokenizer_prepends_bos(self) -> bool:
        return self.live.tokenizer_prepends_bos

    @property
    def tokenizer_appends_eos(self) -> bool:
        return self.live.tokenizer_appends_eos

    @property
    def default_prepend_bos(self) -> bool:
        """Whether `to_tokens` puts BOS in front by default: the family was trained with one and a BOS token exists
        (TransformerLens's choice per architecture). Settable, as in TransformerLens."""
        if self.live.prepend_bos is not None:
            return self.live.prepend_bos
        return self.model_type not in NO_BOS_FAMILIES and self.bos_token_id is not None

    @default_prepend_bos.setter
    def default_prepend_bos(self, value: bool) -> None:
        self.live.prepend_bos = bool(value)

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
            raise ConfigError(f"{path}: cannot read ({(e.strerror or str(e)).lower()})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(cfg, source=str(path), **kw)

    def replace(self, **changes) -> "DecoderConfig":
        """A copy with some fields changed; the live state (device, tokenizer facts) is carried over."""
        new = dataclasses.replace(self, **changes)
        new.live = dataclasses.replace(self.live)
        return new
