"""Normalise transformers `config.json` dicts into the keyword arguments of a DecoderConfig (`decoder_kwargs`;
`DecoderConfig.from_hf` calls it): the fields every family shares, and the readers (RoPE, positive numbers,
activations) the family files in `families/` use for what each family adds. This module knows nothing of
DecoderConfig: config.py imports it, not the reverse.

Options that would change the computation and that residscope does not implement are refused with a message naming the
key, never approximated.
"""

from __future__ import annotations

import math
from typing import Any

from .config_checks import check_config_keys
from .errors import ConfigError
from .rope import RopeParams

FULL = "full_attention"  # transformers' layer_types
SLIDING = "sliding_attention"
SUBLAYER_KEY = "residscope_removed_sublayers"  # config.json key of a sub-block-pruned checkpoint (residscope's own)

POSITIONAL_KEY = "residscope_position_embedding"

# Keys whose non-default value changes the forward pass and that we do not implement: key -> allowed values.
_REFUSED = {
    "use_mrope": (None, False),
    "use_bidirectional_attention": (None, False),
    "pretraining_tp": (None, 1),
    "attention_chunk_size": (None,),
}


def rope_params(cfg: dict, source: str, max_pos: int | None, *, block: dict | None = None,
                partial: float | None = None, interleaved: bool = False) -> RopeParams:
    """RoPE settings from the new `rope_parameters` dict and/or the legacy `rope_theta` + `rope_scaling` keys.

    `partial`: the fraction of each head the family rotates (GPT-NeoX's rotary_pct, Phi-3's partial_rotary_factor),
    given by families whose transformers code honours it; elsewhere a partial_rotary_factor key is refused, since
    transformers rotates the whole head there and ignores it. `interleaved`: GPT-J's rotate-every-two layout."""
    if block is None:
        block = {**(cfg.get("rope_parameters") or {}), **(cfg.get("rope_scaling") or {})}
    params = dict(block)
    if params.get("rope_theta") is None:
        params["rope_theta"] = cfg["rope_theta"] if cfg.get("rope_theta") is not None else 10000.0
    _check_rope_numbers(params, source)
    if partial is None:
        stated = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
        if stated not in (None, 1, 1.0):
            # transformers' RoPE for these architectures rotates the whole head and ignores this key: refuse rather
            # than pick one of two readings of the checkpoint
            raise ConfigError(f"{source}: unsupported option partial_rotary_factor={stated!r}")
        partial = 1.0
    elif not (isinstance(partial, (int, float)) and 0 < partial <= 1):
        raise ConfigError(f"{source}: partial rotary fraction must be in (0, 1], got {partial!r}")
    params["partial_rotary_factor"] = float(partial)
    if params.get("rope_type", params.get("type")) == "longrope":
        params.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    try:
        return RopeParams.from_hf(params, max_position_embeddings=max_pos).replace(interleaved=interleaved)
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


def positive_int(cfg: dict, key: str, source: str, default: int | None = None, *, required: bool = False) -> int | None:
    """An integer config key that sizes the model (a count or a length): a JSON integer >= 1, else a one-line error."""
    value = cfg.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{source}: missing key {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def positive_float(cfg: dict, key: str, source: str, default: float | None) -> float | None:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{source}: {key} must be a finite positive number, got {value!r}")
    return float(value)


def _check_refused(cfg: dict, source: str, family) -> None:
    for key, allowed in _REFUSED.items():
        if key not in family.accepts and cfg.get(key) not in allowed:
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


# transformers' activation names -> what the MLP computes ("gelu_tanh": the tanh approximation, which gelu_new,
# gelu_fast and BLOOM's gelu all compute; "gelu": the exact erf form)
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "bloom_gelu": "gelu_tanh", "gelu": "gelu",
               "relu": "relu"}


def activation(cfg: dict, source: str, key: str | None = None, default: str = "silu") -> str:
    """The MLP activation named by `key` (default: hidden_activation, else hidden_act), refused when unknown."""
    act = cfg.get(key) if key else (cfg.get("hidden_activation") or cfg.get("hidden_act"))
    act = act or default
    if act not in ACTIVATIONS:
        raise ConfigError(f"{source}: unsupported {key or 'hidden_act'} {act!r} (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[act]


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


def resolve_aliases(cfg: dict[str, Any], aliases: dict[str, str], source: str) -> dict[str, Any]:
    """cfg with each alias spelling renamed to the key the family reads (transformers reads both through its config
    class's attribute_map: GPT-2's `num_hidden_layers` is `n_layer`). Both spellings with different values are refused,
    naming the two keys; the returned dict (kept as `hf_config` for export) holds one spelling only."""
    out = dict(cfg)
    for alias, key in aliases.items():
        if alias not in out:
            continue
        value = out.pop(alias)
        if key in out and out[key] != value:
            raise ConfigError(f"{source}: {alias}={value!r} and {key}={out[key]!r} name the same setting with different "
                              "values; keep one")
        out[key] = value
    return out


def decoder_kwargs(cfg: dict[str, Any], *, source: str = "config.json", position_embedding: str | None = None) -> dict:
    """The DecoderConfig keyword arguments of a transformers config dict: the fields every family reads alike
    (`common_fields`), then the family's own (`residscope.model.families`, one file per model_type). `source` names
    the file in error messages."""
    from .families import FAMILIES

    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object of config keys, got a {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ConfigError(f"{source}: unsupported model_type {model_type!r} (supported: {', '.join(sorted(FAMILIES))})")
    cfg = resolve_aliases(cfg, family.aliases, source)
    _check_refused(cfg, source, family)
    check_config_keys(cfg, source, family)  # quantization, RoPE blocks, token ids (model/config_checks.py)
    _check_dual_chunk(cfg, source)
    if position_embedding is not None and model_type != "baichuan":
        raise ConfigError(f"position_embedding override is only for baichuan configs, not {model_type!r}")
    try:
        common = common_fields(cfg, source, family)
        if model_type == "baichuan":
            return family.read_config(cfg, common, source, position_embedding=position_embedding)
        return family.read_config(cfg, common, source)
    except (TypeError, KeyError) as e:
        raise ConfigError(f"{source}: {e}") from None


def common_fields(cfg: dict, source: str, family) -> dict:
    """The DecoderConfig fields every family has, read from the config keys the family names (`family.keys`)."""
    keys = family.keys
    d_model = positive_int(cfg, keys["hidden_size"], source, required=True)
    n_heads = positive_int(cfg, keys["num_attention_heads"], source, required=True)
    n_layers = positive_int(cfg, keys["num_hidden_layers"], source, required=True)
    d_head = positive_int(cfg, keys["head_dim"], source, d_model // n_heads) if keys.get("head_dim") else d_model // n_heads
    if d_head == 0:
        raise ConfigError(f"{source}: hidden_size {d_model} < num_attention_heads {n_heads} and no head_dim")
    for key in ("sliding_window", "model_max_length", "sliding_window_pattern"):
        if key == "sliding_window" and cfg.get(key) == 0 and cfg.get("use_sliding_window") is False:
            continue  # Qwen2-MoE writes sliding_window 0 when sliding is off
        positive_int(cfg, key, source)
    d_mlp_key = keys.get("intermediate_size")
    return dict(
        model_type=family.model_type,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=positive_int(cfg, keys["num_key_value_heads"], source, n_heads) if keys.get("num_key_value_heads") else n_heads,
        d_head=d_head,
        # families whose config may leave the MLP width out (GPT-2's n_inner: None = 4 x hidden) set it themselves
        d_mlp=positive_int(cfg, d_mlp_key, source, 4 * d_model) if d_mlp_key else 4 * d_model,
        d_vocab=positive_int(cfg, keys["vocab_size"], source, required=True),
        norm_eps=positive_float(cfg, keys["norm_eps"], source, 1e-6 if keys["norm_eps"] == "rms_norm_eps" else 1e-5),
        act=activation(cfg, source),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", family.tie_default)),
        max_position_embeddings=positive_int(cfg, keys["max_position_embeddings"], source) if keys.get("max_position_embeddings") else None,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        **_removed_sublayers(cfg, source, n_layers),
        hf_config=dict(cfg),
    )


def llama_layout(cfg: dict, common: dict, source: str, *, window: int | None = None) -> dict:
    """Llama's choices, which most families start from: RoPE on every layer, optional attention / MLP biases.
    residscope's own `residscope_position_embedding` key ("none" for NoPE, "alibi") marks the zoo models trained here;
    transformers ignores it, so those run correctly only in residscope."""
    positional = cfg.get(POSITIONAL_KEY, "rope")
    if positional not in ("rope", "alibi", "none"):
        raise ConfigError(f"{source}: {POSITIONAL_KEY} must be 'rope', 'alibi' or 'none', got {positional!r}")
    layer_types = cfg.get("layer_types") or [SLIDING if window else FULL] * common["n_layers"]
    max_pos = common["max_position_embeddings"]
    bias = bool(cfg.get("attention_bias", False))
    return dict(common, qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)), positional=positional,
                rope={t: rope_params(cfg, source, max_pos) for t in set(layer_types)} if positional == "rope" else {},
                layer_types=list(layer_types), sliding_window=window)
