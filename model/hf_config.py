"""Normalise transformers `config.json` dicts (llama, mistral, qwen2, gemma3_text, baichuan) into the keyword arguments
of a DecoderConfig (`decoder_kwargs`; `DecoderConfig.from_hf` calls it). One function per family says what that family
adds to the fields all of them share. This module knows nothing of DecoderConfig: config.py imports it, not the reverse.

Options that would change the computation and that residscope does not implement are refused with a message naming the
key, never approximated.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError
from .rope import RopeParams

FULL = "full_attention"  # transformers' layer_types
SLIDING = "sliding_attention"
SUBLAYER_KEY = "residscope_removed_sublayers"  # config.json key of a sub-block-pruned checkpoint (residscope's own)

SUPPORTED = ("llama", "mistral", "qwen2", "gemma3_text", "baichuan")
POSITIONAL_KEY = "residscope_position_embedding"

# Keys whose non-default value changes the forward pass and that we do not implement: key -> allowed values.
_REFUSED = {
    "use_mrope": (None, False),
    "use_bidirectional_attention": (None, False),
    "pretraining_tp": (None, 1),
    "attention_chunk_size": (None,),
}


def _rope_params(cfg: dict, source: str, max_pos: int | None, *, block: dict | None = None) -> RopeParams:
    """RoPE settings from the new `rope_parameters` dict and/or the legacy `rope_theta` + `rope_scaling` keys."""
    if block is None:
        block = {**(cfg.get("rope_parameters") or {}), **(cfg.get("rope_scaling") or {})}
    params = dict(block)
    if params.get("rope_theta") is None:
        params["rope_theta"] = cfg["rope_theta"] if cfg.get("rope_theta") is not None else 10000.0
    _check_rope_numbers(params, source)
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        # transformers' RoPE for these architectures rotates the whole head and ignores this key: refuse rather
        # than pick one of two readings of the checkpoint
        raise ConfigError(f"{source}: unsupported option partial_rotary_factor={partial!r}")
    params.pop("partial_rotary_factor", None)
    try:
        return RopeParams.from_hf(params, max_position_embeddings=max_pos)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: rope_parameters: {e}") from None


# RoPE parameters that enter the frequencies as bases, divisors or exponents: NaN, Inf, zero or a negative value gives
# NaN or Inf cos/sin and so NaN logits, never an error, so they are refused here.
_ROPE_POSITIVE = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                  "attention_factor", "mscale", "mscale_all_dim", "original_max_position_embeddings")


def _check_rope_numbers(params: dict, source: str) -> None:
    for key in _ROPE_POSITIVE:
        value = params.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{source}: {key} must be a finite positive number, got {value!r}")
    low, high = params.get("low_freq_factor"), params.get("high_freq_factor")
    if params.get("rope_type", params.get("type")) == "llama3" and low is not None and low == high:
        raise ConfigError(f"{source}: low_freq_factor and high_freq_factor must differ (llama3 divides by their difference)")


def _positive_int(cfg: dict, key: str, source: str, default: int | None = None, *, required: bool = False) -> int | None:
    """An integer config key that sizes the model (a count or a length): a JSON integer >= 1, else a one-line error."""
    value = cfg.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{source}: missing key {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _positive_float(cfg: dict, key: str, source: str, default: float | None) -> float | None:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{source}: {key} must be a finite positive number, got {value!r}")
    return float(value)


def _check_refused(cfg: dict, source: str) -> None:
    for key, allowed in _REFUSED.items():
        if cfg.get(key) not in allowed:
            raise ConfigError(f"{source}: unsupported option {key}={cfg[key]!r}")


def _check_dual_chunk(cfg: dict, source: str) -> None:
    """`dual_chunk_attention_config` (Qwen2.5-1M) turns on Dual Chunk Attention at load (model/dca.py reads it from the
    config's hf_config); a malformed block is refused here, naming the key."""
    block = cfg.get("dual_chunk_attention_config")
    if block is None:
        return
    from .dca import DualChunk

    try:
        DualChunk.from_hf(block)
    except ValueError as e:
        raise ConfigError(f"{source}: dual_chunk_attention_config: {e}") from None
    if cfg.get(POSITIONAL_KEY, "rope") != "rope":
        raise ConfigError(f"{source}: dual_chunk_attention_config needs RoPE positions")


def _activation(cfg: dict, source: str) -> str:
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act in ("silu", "swish"):
        return "silu"
    if act in ("gelu_pytorch_tanh", "gelu_tanh"):
        return "gelu_tanh"
    raise ConfigError(f"{source}: unsupported hidden_act {act!r}")


def _removed_sublayers(cfg: dict, source: str, n_layers: int) -> dict[str, tuple[int, ...]]:
    """removed_attn / removed_mlp from residscope's key for sub-block-pruned checkpoints (written by export)."""
    removed = cfg.get(SUBLAYER_KEY) or {}
    if not isinstance(removed, dict):
        raise ConfigError(f"{source}: {SUBLAYER_KEY} must be an object {{'attn': [...], 'mlp': [...]}}")
    out = {}
    for part in ("attn", "mlp"):
        layers = removed.get(part, [])
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
                raise ConfigError(f"{source}: {SUBLAYER_KEY}.{part} names layer {layer!r}, the model has {n_layers}")
        out[f"removed_{part}"] = tuple(layers)
    return out


def decoder_kwargs(cfg: dict[str, Any], *, source: str = "config.json", position_embedding: str | None = None) -> dict:
    """The DecoderConfig keyword arguments of a transformers config dict: the fields every family reads alike, then
    the family's own (one function each below). `source` names the file in error messages."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object of config keys, got a {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(f"{source}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED)})")
    _check_refused(cfg, source)
    _check_dual_chunk(cfg, source)
    if position_embedding is not None and model_type != "baichuan":
        raise ConfigError(f"position_embedding override is only for baichuan configs, not {model_type!r}")
    try:
        common = _common(cfg, source, model_type)
        if model_type == "baichuan":
            return _baichuan(cfg, common, source, position_embedding)
        return FAMILIES[model_type](cfg, common, source)
    except (TypeError, KeyError) as e:
        raise ConfigError(f"{source}: {e}") from None


def _common(cfg: dict, source: str, model_type: str) -> dict:
    d_model = _positive_int(cfg, "hidden_size", source, required=True)
    n_heads = _positive_int(cfg, "num_attention_heads", source, required=True)
    n_layers = _positive_int(cfg, "num_hidden_layers", source, required=True)
    d_head = _positive_int(cfg, "head_dim", source, d_model // n_heads)
    if d_head == 0:
        raise ConfigError(f"{source}: hidden_size {d_model} < num_attention_heads {n_heads} and no head_dim")
    for key in ("sliding_window", "model_max_length", "sliding_window_pattern"):
        _positive_int(cfg, key, source)
    return dict(
        model_type=model_type,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=_positive_int(cfg, "num_key_value_heads", source, n_heads),
        d_head=d_head,
        d_mlp=_positive_int(cfg, "intermediate_size", source, required=True),
        d_vocab=_positive_int(cfg, "vocab_size", source, required=True),
        norm_eps=_positive_float(cfg, "rms_norm_eps", source, 1e-6),
        act=_activation(cfg, source),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", model_type in ("gemma3_text",))),
        max_position_embeddings=_positive_int(cfg, "max_position_embeddings", source),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        **_removed_sublayers(cfg, source, n_layers),
        hf_config=dict(cfg),
    )


def _llama(cfg: dict, common: dict, source: str, *, window: int | None = None) -> dict:
    """Llama: RoPE on every layer, optional biases. residscope's own `residscope_position_embedding` key ("none" for
    NoPE, "alibi") marks the zoo models trained here; transformers ignores it, so those run correctly only in residscope."""
    positional = cfg.get(POSITIONAL_KEY, "rope")
    if positional not in ("rope", "alibi", "none"):
        raise ConfigError(f"{source}: {POSITIONAL_KEY} must be 'rope', 'alibi' or 'none', got {positional!r}")
    layer_types = cfg.get("layer_types") or [SLIDING if window else FULL] * common["n_layers"]
    max_pos = common["max_position_embeddings"]
    bias = bool(cfg.get("attention_bias", False))
    return dict(common, qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)), positional=positional,
                rope={t: _rope_params(cfg, source, max_pos) for t in set(layer_types)} if positional == "rope" else {},
                layer_types=list(layer_types), sliding_window=window)


def _mistral(cfg: dict, common: dict, source: str) -> dict:
    """Mistral: Llama with `sliding_window` on every layer (None: full attention)."""
    return _llama(cfg, common, source, window=cfg.get("sliding_window"))


def _qwen2(cfg: dict, common: dict, source: str) -> dict:
    """Qwen2: q/k/v biases; with `use_sliding_window`, layers from `max_window_layers` on slide."""
    n_layers = common["n_layers"]
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    layer_types = cfg.get("layer_types") or [
        SLIDING if window is not None and i >= cfg.get("max_window_layers", n_layers) else FULL for i in range(n_layers)
    ]
    if window is None:
        layer_types = [FULL] * n_layers
    return dict(common, qkv_bias=True, o_bias=False, layer_types=list(layer_types), sliding_window=window,
                rope={t: _rope_params(cfg, source, common["max_position_embeddings"]) for t in set(layer_types)})


def _gemma3_text(cfg: dict, common: dict, source: str) -> dict:
    """Gemma 3: (1 + w) RMSNorms, scaled embeddings, q/k norms, post-norms; local (sliding) layers with their own RoPE
    base between global ones."""
    n_layers = common["n_layers"]
    pattern = cfg.get("sliding_window_pattern", 6)
    layer_types = cfg.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
    max_pos = common["max_position_embeddings"]
    rp = cfg.get("rope_parameters") or {}
    if FULL in rp or SLIDING in rp:  # transformers 5 format: one block per layer type
        full_block = dict(rp.get(FULL) or {})
        local_block = dict(rp.get(SLIDING) or {})
    else:  # legacy: rope_theta (+ rope_scaling) for global layers, rope_local_base_freq for local layers
        full_block = dict(cfg.get("rope_scaling") or {})
        full_block.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        local_block = {"rope_type": "default", "rope_theta": _positive_float(cfg, "rope_local_base_freq", source, 10_000.0)}
    full_block.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
    local_block.setdefault("rope_theta", _positive_float(cfg, "rope_local_base_freq", source, 10_000.0))
    bias = bool(cfg.get("attention_bias", False))
    return dict(
        common,
        qkv_bias=bias, o_bias=bias,
        norm_offset=1.0,
        embed_scale=math.sqrt(common["d_model"]),
        qk_norm=True,
        post_norms=True,
        rope={
            FULL: _rope_params(cfg, source, max_pos, block=full_block),
            SLIDING: _rope_params(cfg, source, max_pos, block=local_block),
        },
        layer_types=list(layer_types),
        sliding_window=cfg.get("sliding_window"),
        attn_scale=_positive_float(cfg, "query_pre_attn_scalar", source, 256.0) ** -0.5,  # Gemma3TextConfig's default
        # Gemma 3 replaced Gemma 2's attention soft-capping by q/k norms: transformers keeps the config key but never
        # applies it (only the final one), so neither do we.
        attn_softcap=None,
        final_softcap=_positive_float(cfg, "final_logit_softcapping", source, None),
    )


def _baichuan(cfg: dict, common: dict, source: str, position_embedding: str | None = None) -> dict:
    """Baichuan 2: RoPE when the config has max_position_embeddings (7B), ALiBi when it has only model_max_length (13B)."""
    if position_embedding is None:
        position_embedding = "rope" if cfg.get("max_position_embeddings") is not None else "alibi"
    if position_embedding not in ("rope", "alibi"):
        raise ConfigError(f"position_embedding must be 'rope' or 'alibi', got {position_embedding!r}")
    if common["n_kv_heads"] != common["n_heads"]:
        raise ConfigError(f"{source}: baichuan has no grouped-query attention (num_key_value_heads)")
    max_pos = cfg.get("max_position_embeddings") or cfg.get("model_max_length")
    common = {**common, "max_position_embeddings": max_pos, "tie_embeddings": bool(cfg.get("tie_word_embeddings", False))}
    rope = {FULL: _rope_params(cfg, source, max_pos)} if position_embedding == "rope" else {}
    return dict(common, norm_head=True, positional=position_embedding, rope=rope)


FAMILIES = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "gemma3_text": _gemma3_text, "baichuan": _baichuan}
