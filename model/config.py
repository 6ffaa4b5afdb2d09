"""DecoderConfig: one normalised description of every decoder residscope runs.

`DecoderConfig.from_hf(config_dict)` reads a transformers `config.json` of any family in
`model/families/` and refuses what it cannot reproduce exactly. What a family computes differently is a field here. Derived quantities are properties, never stored twice.
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
    # ---- what a family changes (model/families/): each field is one computation, read by the decoder as data ----
    act: str = "silu"  # MLP activation: "silu", "gelu_tanh" (gelu_new, gelu_pytorch_tanh), "gelu" (erf), "relu"
    mlp: str = "gated"  # "gated": down(act(gate(x)) * up(x)) (SwiGLU, GeGLU); "plain": down(act(up(x))) (GPT-2, OPT, ...)
    norm: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm, with a bias when norm_bias)
    norm_bias: bool = True  # LayerNorm only
    norm_affine: bool = True  # LayerNorm only; False: neither weight nor bias (OPT's layer_norm_elementwise_affine=False)
    norm_offset: float = 0.0  # 1.0 for Gemma's (1 + w) RMSNorm
    norm_wide_gain: bool = False  # RMSNorm multiplies its weight in float32, then rounds (OLMo 2's (w * x).to(dtype))
    pre_norms: bool = True  # ln1 / ln2 before attention / MLP (OLMo 2 has none: only post_norms)
    post_norms: bool = False  # ln1_post / ln2_post on the attention / MLP output before the residual add (Gemma 2/3, OLMo 2)
    residual_norm: bool = False  # post-LN: x = ln1(x + attn(x)), x = ln2(x + mlp(x)) (OPT-350m's do_layer_norm_before=False)
    parallel: bool = False  # x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX's use_parallel_residual, GPT-J)
    shared_norm: bool = False  # parallel block whose MLP reads ln1's output too (GPT-J: one norm per block)
    final_norm: bool = True  # ln_final before the unembedding (OPT-350m has none)
    embed_scale: float | None = None  # embeddings multiplied by it (Gemma: sqrt(d_model); Granite: embedding_multiplier)
    embed_scale_rounded: bool = True  # embed_scale rounded to the model dtype first (Gemma's buffer); False: the exact
    # number, as Granite multiplies by a Python float (differs in bf16 when the multiplier is not a bf16 number)
    embed_norm: bool = False  # a norm on the token embedding, inside hook_embed (BLOOM's word_embeddings_layernorm)
    d_embed: int | None = None  # embeddings narrower than the stream, projected in and out (OPT's word_embed_proj_dim)
    residual_scale: float | None = None  # attention and MLP outputs multiplied by it before the add (Granite)
    logit_divisor: float | None = None  # logits divided by it (Granite's logits_scaling)
    unembed_bias: bool = False  # lm_head has a bias (GPT-J)
    qk_norm: str | None = None  # "head": RMSNorm of q and k per head (Gemma 3, Qwen3); "full": over all heads (OLMo 2)
    norm_head: bool = False  # Baichuan 2 L2-normalises every row of lm_head
    positional: str = "rope"  # "rope", "alibi", "learned" (absolute position table, GPT-2 / OPT) or "none"
    rope: dict[str, RopeParams] = field(default_factory=dict)  # per layer type (FULL / SLIDING)
    no_rope: tuple[int, ...] = ()  # layers that apply no rotary position at all (SmolLM3's NoPE layers)
    rope_wide: bool = False  # q/k rotated with float32 cos/sin, then rounded to the model dtype (OLMo 2/3); else
    # cos/sin are rounded to the model dtype first (Llama)
    pos_offset: int = 0  # learned positions: position p reads row p + pos_offset (OPT: 2)
    layer_types: list[str] = field(default_factory=list)  # FULL or SLIDING per layer
    sliding_window: int | None = None
    # what q·k is multiplied by; None: 1/sqrt(d_head). (TransformerLens's `attn_scale` is the divisor: see the property)
    attn_multiplier: float | None = None
    attn_fp32: bool = False  # q·k and softmax in at least float32 (GPT-Neo, GPT-J); half-precision models take the explicit path
    attn_softcap: float | None = None
    attn_sinks: bool = False  # a learned logit per head (`attn.sinks`) joins every softmax row as an extra column,
    # then is dropped: pattern rows over the real keys sum to 1 - sink mass (gpt-oss)
    final_softcap: float | None = None
    max_position_embeddings: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # ---- mixture of experts (model/moe.py): `sparse_layers` run routed experts instead of the dense MLP ----
    n_experts: int = 0  # routed experts per sparse layer (0: every MLP is dense)
    experts_per_tok: int = 0  # top-k experts each token is routed to
    d_expert: int = 0  # width of one routed expert's MLP (moe_intermediate_size)
    d_shared_expert: int = 0  # width of the always-on shared expert (0: none); scaled by sigmoid(shared_expert_gate(x))
    norm_topk_prob: bool = False  # renormalise the k chosen probabilities to sum to 1
    sparse_layers: tuple[int, ...] = ()  # layers whose MLP is a mixture of experts (current numbering)
    router_bias: bool = False  # the router linear has a bias (gpt-oss)
    routing_fp32: bool = False  # routing weights stay float32 until each expert's output is scaled (Mixtral)
    topk_then_softmax: bool = False  # top-k of the router LOGITS, then softmax over the k chosen in the logits' dtype
    # (gpt-oss); else softmax over all experts in float32, then top-k (then renormalise when norm_topk_prob)
    expert_bias: bool = False  # routed experts' projections have biases (gpt-oss)
    swiglu_limit: float | None = None  # routed experts' clamped SwiGLU (gpt-oss): gate.clamp(max=L), up.clamp(-L, L),
    # out = (up + 1) * gate * sigmoid(swiglu_alpha * gate); None: act(gate) * up
    swiglu_alpha: float = 1.702  # sigmoid gain of the clamped SwiGLU (used only with swiglu_limit)
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
        if self.act not in ("silu", "gelu_tanh", "gelu", "relu"):
            raise ConfigError(f"unsupported activation {self.act!r}")
        if self.mlp not in ("gated", "plain") or self.norm not in ("rms", "layer"):
            raise ConfigError(f"unsupported mlp {self.mlp!r} / norm {self.norm!r}")
        if self.qk_norm is True:  # older callers said qk_norm=True for Gemma 3's per-head norms
            self.qk_norm = "head"
        if self.qk_norm not in (None, False, "head", "full"):
            raise ConfigError(f"unsupported qk_norm {self.qk_norm!r}")
        self.qk_norm = self.qk_norm or None
        if self.positional not in ("rope", "alibi", "learned", "none"):
            raise ConfigError(f"unsupported position embedding {self.positional!r}")
        if self.positional == "learned" and not self.max_position_embeddings:
            raise ConfigError("learned positions need max_position_embeddings (the table's size)")
        if self.sparse_layers and not (self.n_experts >= 1 and 1 <= self.experts_per_tok <= self.n_experts
                                       and self.d_expert >= 1):
            raise ConfigError(f"mixture of experts: need 1 <= experts_per_tok ({self.experts_per_tok}) <= n_experts "
                              f"({self.n_experts}) and d_expert >= 1 ({self.d_expert})")
        for name in ("removed_attn", "removed_mlp", "no_rope", "sparse_layers"):
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
        """What q·k is multiplied by."""
        return self.attn_multiplier if self.attn_multiplier is not None else 1.0 / math.sqrt(self.d_head)

    def has_attn(self, layer: int) -> bool:
        return layer not in self.removed_attn

    def has_mlp(self, layer: int) -> bool:
        return layer not in self.removed_mlp

    def window_of(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def rope_of(self, layer: int) -> RopeParams | None:
        """The configured RoPE of a layer: None without rotary positions (another kind, or a NoPE layer)."""
        if self.positional != "rope" or layer in self.no_rope:
            return None
        return self.rope.get(self.layer_types[layer])

    @property
    def d_embedding(self) -> int:
        """Width of the token embedding (and of the unembedding's input): d_model unless projected (OPT-350m)."""
        return self.d_embed or self.d_model

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
        """The activation's name as the checkpoint's config says it (GPT-2: "gelu_new"), as TransformerLens reports it;
        the canonical name when the config names none (BLOOM)."""
        from .hf_config import ACTIVATIONS

        for key in ("activation_function", "hidden_act", "hidden_activation"):
            name = self.hf_config.get(key)
            if isinstance(name, str) and ACTIVATIONS.get(name) == self.act:
                return name
        return {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}[self.act]

    @property
    def normalization_type(self) -> str:
        return "RMS" if self.norm == "rms" else "LN"

    @property
    def uses_rms_norm(self) -> bool:
        return self.norm == "rms"

    @property
    def final_rms(self) -> bool:
        return self.norm == "rms" and self.final_norm

    @property
    def eps(self) -> float:
        return self.norm_eps

    @property
    def gated_mlp(self) -> bool:
        return self.mlp == "gated"

    @property
    def attn_only(self) -> bool:
        """True when sub-block surgery removed every MLP."""
        return self.n_layers > 0 and len(self.removed_mlp) == self.n_layers

    @property
    def positional_embedding_type(self) -> str:
        return {"rope": "rotary", "alibi": "alibi", "learned": "standard", "none": "none"}[self.positional]

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
        """True for GPT-J's interleaved layout (2i with 2i + 1); rotate_half pairs dimension i with i + rotary_dim / 2."""
        params = self.rope.get(FULL) or next(iter(self.rope.values()), None)
        return bool(params is not None and params.interleaved)

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
        """Norms on each half's input AND output (Gemma 2/3); OLMo 2 normalises the outputs only."""
        return self.post_norms and self.pre_norms

    @property
    def rmsnorm_uses_offset(self) -> bool:
        """Gemma's (1 + w) RMSNorm (TransformerLens's name)."""
        return self.norm == "rms" and self.norm_offset != 0

    @property
    def use_qk_norm(self) -> bool:
        return self.qk_norm is not None

    @property
    def attn_scores_soft_cap(self) -> float:
        return self.attn_softcap if self.attn_softcap is not None else -1.0

    @property
    def output_logits_soft_cap(self) -> float:
        return self.final_softcap if self.final_softcap is not None else -1.0

    @property
    def parallel_attn_mlp(self) -> bool:
        return self.parallel

    @property
    def layer_norm_folding(self) -> bool:
        return False  # residscope never folds norms into weights

    @property
    def attn_scale(self) -> float:
        """TransformerLens's attn_scale: what q·k is DIVIDED by (sqrt(d_head) by default, sqrt(query_pre_attn_scalar)
        for Gemma 2/3, 1 for GPT-Neo's unscaled attention); residscope's own `scale` / `attn_multiplier` is its
        inverse."""
        return 1.0 / self.scale

    @property
    def use_attn_scale(self) -> bool:
        """TransformerLens's switch: False where q·k is not scaled at all (GPT-Neo, GPT-2 with scale_attn_weights=False)."""
        return self.scale != 1.0

    @property
    def num_experts(self) -> int | None:
        return self.n_experts if self.sparse_layers else None

    @property
    def experts_per_token(self) -> int | None:
        return self.experts_per_tok if self.sparse_layers else None

    def is_sparse(self, layer: int) -> bool:
        """True when block `layer`'s MLP is a mixture of experts."""
        return layer in self.sparse_layers

    @property
    def n_devices(self) -> int:
        return 1

    @property
    def original_architecture(self) -> str:
        from .families import family_of

        names = self.hf_config.get("architectures") or [family_of(self.model_type).architecture]
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
        from .families import family_of

        return family_of(self.model_type).prepend_bos and self.bos_token_id is not None

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
        except ConfigError as e:  # a field check (__post_init__): say which file
            if str(e).startswith(source):
                raise
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
