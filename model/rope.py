"""Rotary position embeddings: frequencies for every scaling transformers knows, and how to apply them.

The formulas follow transformers' `modeling_rope_utils.py` exactly (same float32 arithmetic), so that cos/sin are
bit-comparable with the reference; analyses that want float64 pass `dtype=torch.float64`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .errors import InputError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


@dataclass(frozen=True)
class RopeParams:
    """One RoPE setting. `rope_type` selects the scaling; unused fields are ignored by that scaling."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    partial_rotary_factor: float = 1.0
    original_max_position_embeddings: int | None = None  # yarn, llama3; dynamic uses max_position_embeddings
    max_position_embeddings: int | None = None  # the model's, needed by dynamic NTK and yarn without factor
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: None -> 0.1 ln(s) + 1
    mscale: float | None = None  # yarn (DeepSeek variant)
    mscale_all_dim: float | None = None
    truncate: bool = True  # yarn
    short_factor: tuple[float, ...] | None = None  # longrope: per-frequency divisors up to original_max_position_embeddings
    long_factor: tuple[float, ...] | None = None  # longrope: beyond it
    interleaved: bool = False  # GPT-J's layout: dimension 2i pairs with 2i + 1 (rotate_every_two), not i with i + d/2

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise InputError(f"unsupported rope_type {self.rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
        # `not x > 0` also refuses NaN; every field that scales frequencies must be a finite positive number
        if not (math.isfinite(self.theta) and self.theta > 0):
            raise InputError(f"theta: RoPE base must be finite and > 0, got {self.theta}")
        if self.rope_type != "default" and not (math.isfinite(self.factor) and self.factor > 0):
            raise InputError(f"factor: RoPE scaling factor must be finite and > 0, got {self.factor}")
        if self.rope_type in ("yarn", "llama3") and self.original_max_position_embeddings is None:
            raise InputError(f"rope_type {self.rope_type!r} needs original_max_position_embeddings")
        if self.rope_type == "dynamic" and self.max_position_embeddings is None:
            raise InputError("rope_type 'dynamic' needs max_position_embeddings")
        if self.rope_type == "longrope":
            if self.original_max_position_embeddings is None or self.short_factor is None or self.long_factor is None:
                raise InputError("rope_type 'longrope' needs short_factor, long_factor and original_max_position_embeddings")
            for name in ("short_factor", "long_factor"):
                values = getattr(self, name)
                if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values):
                    raise InputError(f"{name}: longrope factors must be finite positive numbers")
        if not 0 < self.partial_rotary_factor <= 1:
            raise InputError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")

    def replace(self, **changes) -> "RopeParams":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, params: dict, *, max_position_embeddings: int | None) -> "RopeParams":
        """From a transformers `rope_parameters` / `rope_scaling` dict (with `rope_theta` merged in)."""
        known = {
            "rope_type", "type", "rope_theta", "factor", "partial_rotary_factor", "original_max_position_embeddings",
            "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor", "mscale",
            "mscale_all_dim", "truncate", "short_factor", "long_factor",
        }
        unknown = set(params) - known
        if unknown:
            raise InputError(f"unsupported rope parameters {sorted(unknown)}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        kw = dict(theta=float(params.get("rope_theta", 10000.0)), rope_type=rope_type, max_position_embeddings=max_position_embeddings)
        for key in ("factor", "partial_rotary_factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            if params.get(key) is not None:
                kw[key] = float(params[key])
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if params.get(key) is not None:
                kw[key] = float(params[key])
        if params.get("original_max_position_embeddings") is not None:
            kw["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
        if "truncate" in params:
            kw["truncate"] = bool(params["truncate"])
        for key in ("short_factor", "long_factor"):
            if params.get(key) is not None:
                kw[key] = tuple(float(v) for v in params[key])
        if rope_type == "longrope" and params.get("factor") is None and max_position_embeddings and kw.get("original_max_position_embeddings"):
            # transformers: the ratio of the two lengths sets the attention factor when no factor is given
            kw["factor"] = max_position_embeddings / kw["original_max_position_embeddings"]
        if rope_type == "yarn" and params.get("factor") is None:
            # transformers: factor defaults to max_position_embeddings / original_max_position_embeddings
            kw["factor"] = max_position_embeddings / kw["original_max_position_embeddings"]
        return cls(**kw)

    def to_hf(self) -> dict:
        """The transformers `rope_parameters` dict for this setting (inverse of `from_hf`)."""
        out = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = self.partial_rotary_factor
        if self.rope_type != "default":
            out["factor"] = self.factor
        if self.rope_type in ("yarn", "llama3", "longrope"):
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.rope_type == "longrope":
            out.update(short_factor=list(self.short_factor), long_factor=list(self.long_factor))
            if self.attention_factor is not None:
                out["attention_factor"] = self.attention_factor
        if self.rope_type == "llama3":
            out.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor)
        if self.rope_type == "yarn":
            out.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate)
            for key in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self, key) is not None:
                    out[key] = getattr(self, key)
        return out


def rotary_dim(params: RopeParams, head_dim: int) -> int:
    return int(head_dim * params.partial_rotary_factor)


def _base_inv_freq(base: float, dim: int, dtype: torch.dtype) -> torch.Tensor:
    # transformers: 1 / base ** (arange(0, dim, 2, int64).float() / dim)
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype) / dim))


def inv_freq(params: RopeParams, head_dim: int, seq_len: int | None = None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
    """Inverse frequencies θ_i [rotary_dim // 2] and the cos/sin scaling factor (YaRN's attention factor, else 1).

    `seq_len` (the current total length) only matters for dynamic NTK, which rescales once it exceeds the window.
    """
    dim = rotary_dim(params, head_dim)
    base, factor = params.theta, params.factor
    if params.rope_type == "default":
        return _base_inv_freq(base, dim, dtype), 1.0
    if params.rope_type == "linear":
        return _base_inv_freq(base, dim, dtype) / factor, 1.0
    if params.rope_type == "dynamic":
        max_pos = params.max_position_embeddings
        seq_len = max(seq_len or max_pos, max_pos)
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim, dtype), 1.0
    if params.rope_type == "llama3":
        return _llama3_inv_freq(params, dim, dtype), 1.0
    if params.rope_type == "yarn":
        return _yarn_inv_freq(params, dim, dtype)
    if params.rope_type == "longrope":
        return _longrope_inv_freq(params, dim, seq_len, dtype)
    raise AssertionError(params.rope_type)


def _longrope_inv_freq(p: RopeParams, dim: int, seq_len: int | None, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """Phi-3's LongRoPE: the long factors once the sequence exceeds the original window, the short ones before (chosen
    per forward from the current length, like transformers' longrope_frequency_update); attention factor
    sqrt(1 + ln(factor) / ln(original window))."""
    orig = p.original_max_position_embeddings
    attention_factor = p.attention_factor
    if attention_factor is None:
        attention_factor = 1.0 if p.factor <= 1.0 else math.sqrt(1 + math.log(p.factor) / math.log(orig))
    ext = p.long_factor if seq_len is not None and seq_len > orig else p.short_factor
    if len(ext) != dim // 2:
        raise InputError(f"longrope factors have {len(ext)} entries, the rotated dimensions need {dim // 2}")
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return (1.0 / (torch.tensor(ext, dtype=torch.float32) * p.theta**shape)).to(dtype), attention_factor


def _llama3_inv_freq(p: RopeParams, dim: int, dtype: torch.dtype) -> torch.Tensor:
    freq = _base_inv_freq(p.theta, dim, dtype)
    old_len = p.original_max_position_embeddings
    low_freq_wavelen = old_len / p.low_freq_factor
    high_freq_wavelen = old_len / p.high_freq_factor
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_freq_wavelen, freq / p.factor, freq)
    smooth = (old_len / wavelen - p.low_freq_factor) / (p.high_freq_factor - p.low_freq_factor)
    smoothed = (1 - smooth) * scaled / p.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(p: RopeParams, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    base, factor = p.theta, p.factor
    if p.attention_factor is not None:
        attention_factor = p.attention_factor
    elif p.mscale and p.mscale_all_dim:
        attention_factor = float(yarn_mscale(factor, p.mscale) / yarn_mscale(factor, p.mscale_all_dim))
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(p.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(p.beta_fast), correction_dim(p.beta_slow)
    if p.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers: prevent a singular ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(dtype)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight, attention_factor


def rope_cos_sin(params: RopeParams, head_dim: int, positions: torch.Tensor, seq_len: int | None = None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [batch, pos, rotary_dim] for integer `positions` [batch, pos], computed in float32 like transformers."""
    freq, scaling = inv_freq(params, head_dim, seq_len=seq_len)
    freq = freq.to(positions.device)
    angles = positions[..., None].float() * freq  # [batch, pos, rotary_dim / 2]
    if params.interleaved:
        emb = angles.repeat_interleave(2, dim=-1)  # [batch, pos, rotary_dim]: (θ0, θ0, θ1, θ1, ...)
    else:
        emb = torch.cat((angles, angles), dim=-1)  # [batch, pos, rotary_dim]: (θ0, θ1, ..., θ0, θ1, ...)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim: the "rotate_half" (non-interleaved) RoPE layout of Llama."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) over the last dim: GPT-J's interleaved RoPE layout."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate x [batch, pos, head, d_head] by cos/sin [batch, pos, rotary_dim]; dims past rotary_dim pass through
    (partial rotary: GPT-NeoX, GPT-J, Phi-3). `interleaved`: cos/sin come from an interleaved RopeParams."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    rotate = rotate_every_two if interleaved else rotate_half
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), dim=-1)
