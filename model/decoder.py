"""The hookable decoder: one transformer for every family in `model/families/`, whose differences are DecoderConfig
fields (norm kind and placement, block layout, MLP kind, positions, scales), never branches on the family's name.

Hook names follow TransformerLens, so `run_with_cache`, `run_with_hooks` and `ActivationCache` work unchanged:
    hook_embed
    blocks.{i}.hook_resid_pre / hook_attn_out / hook_resid_mid / hook_mlp_out / hook_resid_post
    blocks.{i}.ln1.hook_normalized, blocks.{i}.ln2.hook_normalized
    blocks.{i}.attn.hook_q / hook_k / hook_v        [batch, pos, head, d_head]  (k, v: key/value heads)
    blocks.{i}.attn.hook_rot_q / hook_rot_k         [batch, pos, head, d_head]  (after RoPE)
    blocks.{i}.attn.hook_attn_scores / hook_pattern [batch, head, q_pos, k_pos] (explicit path only)
    blocks.{i}.attn.hook_z                          [batch, pos, head, d_head]
    blocks.{i}.mlp.hook_pre / hook_pre_linear / hook_post  [batch, pos, d_mlp]
    blocks.{i}.hook_mlp_in                          [batch, pos, d_model]  (resid_mid, copied when hooked)
    blocks.{i}.ln1 / ln2 (/ ln1_post / ln2_post).hook_scale, ln_final.hook_scale  [batch, pos, 1]
    ln_final.hook_normalized
TransformerLens' opt-in hooks fire only after their switch (`model.set_use_attn_result(True)` or `model.cfg.<switch> = True`):
    blocks.{i}.attn.hook_result                     [batch, pos, head, d_model]  (use_attn_result)
    blocks.{i}.hook_q_input                         [batch, pos, head, d_model]  (use_split_qkv_input)
    blocks.{i}.hook_k_input / hook_v_input          [batch, pos, kv_head, d_model]
    blocks.{i}.hook_attn_in                         [batch, pos, head, d_model]  (use_attn_in; not with GQA)
    hook_tokens                                     [batch, pos]  (use_hook_tokens)
Attention runs through SDPA unless a hook is attached to `hook_attn_scores` or `hook_pattern` (or the layer needs
logit soft-capping); then an explicit path computes the same result and exposes scores and pattern. Whole patterns are
refused beyond 8,192 x 8,192 positions; `model.attention_chunks.chunked_patterns` hands them out by blocks of query rows.
With Dual Chunk Attention (`set_dual_chunk_attention`, model/dca.py) hook_rot_q holds the intra-chunk queries and
hook_rot_k the keys at j % chunk_len; hook_attn_scores / hook_pattern hold the merged scores and pattern.
With attention sinks (gpt-oss, `cfg.attn_sinks`) hook_attn_scores holds the real keys' scores and hook_pattern the
softmax over real keys plus the head's sink logit, sink column dropped: rows sum to 1 - sink mass (see Attention).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from . import attention_chunks, dca, export
from . import tokens as tokenizing
from .config import DecoderConfig
from .errors import InputError
from .rope import RopeParams, apply_rope, rope_cos_sin
from .tl_weights import AttentionWeights, DecoderWeights, Embed, MLPWeights, PosEmbed, Unembed

RETURN_TYPES = ("logits", "loss", "both", None)


# ---------------------------------------------------------------------------------------------------------------------
# small pure helpers
# ---------------------------------------------------------------------------------------------------------------------
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[batch, kv_head, pos, d_head] -> [batch, kv_head * n_rep, pos, d_head]; KV head j serves query heads j*n_rep..+n_rep-1."""
    if n_rep == 1:
        return x
    b, kvh, p, d = x.shape
    return x[:, :, None].expand(b, kvh, n_rep, p, d).reshape(b, kvh * n_rep, p, d)


def hooked(hp: HookPoint) -> bool:
    """True when a forward or backward hook is attached: opt-in work (patterns, scales, copies) runs only then."""
    return bool(hp._forward_hooks or hp._backward_hooks)


def repeat_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """[batch, pos, d_model] -> [batch, pos, n, d_model], a real copy so hooks may edit one head's slot in place."""
    return x[:, :, None].expand(x.shape[0], x.shape[1], n, x.shape[2]).contiguous()


def alibi_slopes(n_heads: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ALiBi slopes [n_heads]: 2^(-8(h+1)/n) for a power of two n; otherwise the closest power of two c's slopes,
    then every other slope of the 2c sequence for the remaining n - c heads (Press et al.; Baichuan 2 13B)."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    # plain Python math: this runs inside `torch.device("meta")` when load_model builds the model, where .item() fails
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two_slopes(closest)
    if closest < n_heads:
        slopes += power_of_two_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=dtype)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    per_token: bool = False) -> torch.Tensor:
    """Cross-entropy of predicting token t+1 from position t (TransformerLens's lm_cross_entropy_loss), computed in at
    least float32. logits [batch, pos, vocab], tokens / attention_mask [batch, pos] -> scalar, or [batch, pos - 1]."""
    tokenizing.check_predictable(tokens, attention_mask)
    log_probs = logits[:, :-1].log_softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))  # [batch, pos-1, vocab]
    nll = -log_probs.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]  # [batch, pos - 1]
    if attention_mask is None:
        return nll if per_token else nll.mean()
    if attention_mask.shape != tokens.shape:
        raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}, tokens {tuple(tokens.shape)}")
    mask = attention_mask.to(logits.device).bool()
    counted = mask[:, :-1] & mask[:, 1:]  # [batch, pos - 1]: both the token and the one it predicts are real
    nll = nll.masked_fill(~counted, 0.0)
    return nll if per_token else nll.sum() / counted.sum()


def check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    """One-line refusals of generation settings that would fail deep inside sampling or silently do nothing useful."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k must be an integer >= 1 (or None), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise InputError(f"top_p must be in (0, 1] (or None), got {top_p!r}")


def attention_softmax(scores: torch.Tensor, sinks: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """softmax over the keys of scores [batch, head, q, k], computed in `dtype`. With sinks [head] (gpt-oss), each
    head's learned sink logit joins every row as one more column and is dropped after the softmax: the pattern over the
    real keys sums to 1 - the sink's mass. That softmax is transformers' gpt-oss eager_attention_forward step for step
    (row max subtracted, softmax in the scores' own dtype, so bf16 models match it bitwise), not `dtype`."""
    if sinks is None:
        return F.softmax(scores, dim=-1, dtype=dtype)
    sink = sinks.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:-1], 1)  # [batch, head, q, 1]
    combined = torch.cat((scores, sink), dim=-1)  # [batch, head, q, k + 1]
    combined = combined - combined.max(dim=-1, keepdim=True).values
    return F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]


def sink_factor(lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """[batch, head, q, 1]: the share of a row's softmax mass the real keys keep next to a sink logit,
    sum_j e^s_j / (sum_j e^s_j + e^sink) = sigmoid(lse - sink), from their log-sum-exp lse [batch, head, q]."""
    return torch.sigmoid(lse - sinks.to(lse.dtype)[None, :, None])[..., None]


def attention_allowed(q_idx: torch.Tensor, k_idx: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool [q, k]: causal (j <= i), and within the window (i - W < j) when one is set."""
    allowed = k_idx[None, :] <= q_idx[:, None]
    if window is not None:
        allowed &= k_idx[None, :] > q_idx[:, None] - window
    return allowed


# ---------------------------------------------------------------------------------------------------------------------
# per-forward position state shared by all layers
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Positions:
    """What every attention layer needs to know about positions in one forward call.

    positions: [batch, q_pos] integer position ids of the new tokens (RoPE); key_valid: [batch, k_pos] bool, False for
    padding (None when there is none); past: number of cached tokens before the new ones.
    """

    positions: torch.Tensor
    key_valid: torch.Tensor | None
    past: int
    _cos_sin: dict = field(default_factory=dict)
    _masks: dict = field(default_factory=dict)

    @property
    def q_len(self) -> int:
        return self.positions.shape[1]

    @property
    def k_len(self) -> int:
        return self.past + self.q_len

    def cos_sin(self, params: RopeParams, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (params, head_dim, dtype)
        if key not in self._cos_sin:
            # dynamic NTK rescales and LongRoPE picks its factors from the current total length, like transformers'
            # dynamic_rope_update (only they need the length on the host: a device sync on GPUs, impossible on `meta`)
            seq_len = int(self.positions.max().item()) + 1 if params.rope_type in ("dynamic", "longrope") else None
            self._cos_sin[key] = rope_cos_sin(params, head_dim, self.positions, seq_len=seq_len, dtype=dtype)
        return self._cos_sin[key]

    def needs_mask(self, window: int | None) -> bool:
        """False when plain `is_causal` attention is exact: no padding, no past, and the window covers everything."""
        return self.key_valid is not None or self.past > 0 or (window is not None and window < self.k_len)

    def mask(self, window: int | None) -> torch.Tensor:
        """Bool [batch or 1, 1, q_pos, k_pos]: True where query i may attend key j."""
        if window not in self._masks:
            device = self.positions.device
            q_idx = torch.arange(self.past, self.k_len, device=device)
            k_idx = torch.arange(self.k_len, device=device)
            allowed = attention_allowed(q_idx, k_idx, window)[None, None]  # [1, 1, q, k]
            if self.key_valid is not None:
                allowed = allowed & self.key_valid[:, None, None, :]
                # a padding query may have no visible key: let it see itself so softmax stays finite (output unused)
                allowed = allowed | (q_idx[:, None] == k_idx[None, :])[None, None]
            self._masks[window] = allowed
        return self._masks[window]


class KVCache:
    """Keys (after RoPE) and values per attention module, [batch, kv_head, pos, d_head], grown by each forward.

    Keyed by module rather than layer number, so a cache stays valid on a model whose layers were removed.
    """

    def __init__(self):
        self.entries: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.attention_mask: torch.Tensor | None = None  # [batch, pos] of everything cached so far
        self.length = 0  # tokens cached so far

    def update(self, attn: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old = self.entries.get(attn)
        if old is not None:
            k, v = torch.cat((old[0], k), dim=2), torch.cat((old[1], v), dim=2)
        self.entries[attn] = (k, v)
        return k, v


# ---------------------------------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (float64 for float64 models, where transformers would round through float32: a float64
    run is then float64 throughout and decompositions of it are exact to 1e-9). offset 0: Llama's w * normed.to(dtype);
    offset 1: Gemma's (normed * (1 + w)).to(dtype).

    hook_scale [..., 1] is TransformerLens' sqrt(mean(x^2) + eps). The input is multiplied by rsqrt (transformers'
    arithmetic, so caching changes no logit); a hook that changes the scale, or a backward hook on it, gets TransformerLens'
    x / scale. `wide_gain`: the weight multiplies in float32 before the rounding to the model dtype (OLMo 2), as
    Gemma's (1 + w) always does; Llama rounds first.
    """

    def __init__(self, d: int, eps: float, offset: float = 0.0, wide_gain: bool = False):
        super().__init__()
        self.eps, self.offset, self.wide_gain = eps, offset, wide_gain
        self.weight = nn.Parameter(torch.zeros(d) if offset else torch.ones(d))
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d]

    @property
    def gain(self) -> torch.Tensor:
        """[d]: what the normalised input is multiplied by (weight, or offset + weight for Gemma)."""
        return self.weight + self.offset if self.offset else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        var = xf.pow(2).mean(-1, keepdim=True) + self.eps  # [..., 1]
        normed = xf * torch.rsqrt(var)
        if hooked(self.hook_scale):
            scale = var.sqrt()
            seen = self.hook_scale(scale.clone())  # a copy, so an in-place patch shows
            if self.hook_scale._backward_hooks or seen.is_meta or not torch.equal(seen, scale):
                normed = xf / seen  # TransformerLens' formula: a patched scale is used, gradients reach the scale
        return self.hook_normalized(self._apply_gain(normed, x.dtype))

    def _apply_gain(self, normed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.offset:
            return (normed * (self.offset + self.weight.to(normed.dtype))).to(dtype)
        if self.wide_gain:
            return (normed * self.weight.to(normed.dtype)).to(dtype)
        return self.weight * normed.to(dtype)

    def split(self, parts: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """This norm's output on `total` [batch, pos, d] as shares of `parts` [batch, pos, n, d] (which sum to total):
        every part is divided by total's scale and multiplied by the gain. Exact, since the norm is linear once its
        scale is fixed; the shares sum to forward(total)."""
        wide = torch.promote_types(total.dtype, torch.float32)
        scale = self.hook_scale((total.to(wide).pow(2).mean(-1, keepdim=True) + self.eps).sqrt())  # [batch, pos, 1]
        return self._apply_gain(parts.to(wide) / scale[..., None, :], parts.dtype)  # [batch, pos, n, d]


class LayerNorm(nn.Module):
    """LayerNorm (GPT-2, GPT-NeoX, OPT, BLOOM, ...): (x - mean) / sqrt(var + eps) * w + b, computed like RMSNorm above
    (at least float32, float64 for float64 models). hook_scale [..., 1] is TransformerLens' sqrt(var + eps) of the
    centred input; a hook that changes it is used, as TransformerLens divides by it."""

    def __init__(self, d: int, eps: float, bias: bool = True, affine: bool = True):
        super().__init__()
        self.eps = eps
        # affine=False: no weight and no bias (OPT's layer_norm_elementwise_affine=False)
        self.weight = nn.Parameter(torch.ones(d)) if affine else None
        self.bias = nn.Parameter(torch.zeros(d)) if bias and affine else None
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d]

    @property
    def gain(self) -> torch.Tensor:
        return self.weight if self.weight is not None else torch.ones(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        centred = xf - xf.mean(-1, keepdim=True)  # [..., d]
        scale = (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()  # [..., 1]
        if hooked(self.hook_scale):
            scale = self.hook_scale(scale.clone())
        return self.hook_normalized(self._apply_gain(centred / scale, x.dtype))

    def _apply_gain(self, normed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = normed.to(dtype) if self.weight is None else normed.to(dtype) * self.weight
        return out if self.bias is None else out + self.bias

    def split(self, parts: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        raise ValueError("per-head shares of a LayerNorm'd output are not defined (it centres, and adds a bias)")


class NoNorm(nn.Module):
    """Where a family has no norm (OPT-350m's final one): the input unchanged, with the hook names analyses read."""

    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.hook_normalized = HookPoint()  # [batch, pos, d]

    @property
    def gain(self) -> torch.Tensor:
        return torch.ones(())  # a 0-d CPU tensor multiplies tensors on any device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_normalized(x)


def make_norm(cfg: DecoderConfig, d: int | None = None) -> nn.Module:
    """The family's norm over `d` features (default d_model)."""
    d = cfg.d_model if d is None else d
    if cfg.norm == "layer":
        return LayerNorm(d, cfg.norm_eps, cfg.norm_bias, cfg.norm_affine)
    return RMSNorm(d, cfg.norm_eps, cfg.norm_offset, cfg.norm_wide_gain)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class Attention(AttentionWeights, nn.Module):
    """Grouped-query attention with RoPE or ALiBi, optional q/k norms, sliding window and logit soft-capping.

    It copies the scalars it needs from the config, so a block keeps working after surgery renumbers or drops its
    neighbours. With `cfg.attn_sinks` (gpt-oss) a learned logit per head, `sinks` [head], is one more softmax column
    that attends to nothing: hook_attn_scores holds the scores of the real keys only, hook_pattern the softmax over
    real keys AND sink with the sink column dropped, so a row sums to 1 - sink mass (the sink's mass is 1 - row sum).
    The SDPA path gets the same output from the real keys' log-sum-exp: out = sdpa_out * sigmoid(lse - sink)
    (`sink_factor`). `rope`, `window` and `logit_scale` are run-time settings (Decoder.set_rope / set_window /
    set_attn_logit_scale); `default_rope` / `default_window` are what the checkpoint was built with. TransformerLens'
    weight names (W_Q, W_O, QK, ...) come from AttentionWeights.
    """

    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_head = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.n_rep = cfg.n_rep
        self.scale = cfg.scale
        self.positional = cfg.positional  # "rope", "alibi" or "none"
        self.softcap = cfg.attn_softcap
        self.fp32_scores = cfg.attn_fp32
        self.qk_norm = cfg.qk_norm
        h, kvh, d = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.q_proj = nn.Linear(cfg.d_model, h * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kvh * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kvh * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * d, cfg.d_model, bias=cfg.o_bias)
        self.sinks = nn.Parameter(torch.zeros(h)) if cfg.attn_sinks else None  # [head] learned sink logits (gpt-oss)
        if cfg.qk_norm == "head":  # per head, over d_head (Gemma 3, Qwen3)
            self.q_norm, self.k_norm = make_norm(cfg, d), make_norm(cfg, d)
        elif cfg.qk_norm == "full":  # over the whole projection, before it splits into heads (OLMo 2)
            self.q_norm, self.k_norm = make_norm(cfg, h * d), make_norm(cfg, kvh * d)
        self.default_rope: RopeParams | None = cfg.rope_of(layer)
        self.default_window: int | None = cfg.window_of(layer)
        self.default_dca: dca.DualChunk | None = dca.config_dual_chunk(cfg, layer)
        self.rope, self.window, self.logit_scale = self.default_rope, self.default_window, 1.0
        self.dca = self.default_dca  # Dual Chunk Attention (model/dca.py), a run-time setting like rope
        self.pattern_chunks = None  # (callback(pattern block, first row), rows per block): see model/attention_chunks.py
        self.row_statistics = None  # (callback(RowStats, first row), first_k, statistics, rows): the same module
        self.output_normed = cfg.post_norms  # Gemma 3: the block RMS-normalises this module's output (ln1_post)
        self.rope_wide = cfg.rope_wide  # OLMo 2/3 rotate with float32 cos/sin and round the result
        self.residual_scale = cfg.residual_scale  # Granite: applied here, so per-head results (hook_result) carry it
        self.use_attn_result = False  # TransformerLens switch, kept in step with cfg by Decoder.forward

        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_rot_q = HookPoint()  # [batch, pos, head, d_head], after RoPE
        self.hook_rot_k = HookPoint()  # [batch, pos, kv_head, d_head], after RoPE
        self.hook_attn_scores = HookPoint()  # [batch, head, q_pos, k_pos], explicit path only
        self.hook_pattern = HookPoint()  # [batch, head, q_pos, k_pos], explicit path only
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head, d_model], with use_attn_result only

    def reset_positional(self) -> None:
        self.rope, self.window, self.logit_scale = self.default_rope, self.default_window, 1.0
        self.dca = self.default_dca

    def wants_pattern(self) -> bool:
        return self.wants_pattern_hook() or self.softcap is not None

    def wants_pattern_hook(self) -> bool:
        return hooked(self.hook_attn_scores) or hooked(self.hook_pattern)

    def forward(
        self,
        x: torch.Tensor,
        pos: Positions,
        cache: KVCache | None = None,
        *,
        k_in: torch.Tensor | None = None,
        v_in: torch.Tensor | None = None,
        out_norm: RMSNorm | None = None,
    ) -> torch.Tensor:
        """x [batch, pos, d_model] -> [batch, pos, d_model]. Split-qkv mode: x [batch, pos, head, d_model] feeds the
        queries and k_in / v_in [batch, pos, kv_head, d_model] the keys / values, one input per head. `out_norm` is the
        block's post-attention norm (Gemma 3), applied here so per-head results can carry it."""
        b, p = x.shape[:2]
        q = self.hook_q(self._project(self.q_proj, x, self.n_heads, "q_norm"))  # [batch, pos, head, d_head]
        k = self.hook_k(self._project(self.k_proj, x if k_in is None else k_in, self.n_kv_heads, "k_norm"))  # [batch, pos, kv_head, d_head]
        v = self.hook_v(self._project(self.v_proj, x if v_in is None else v_in, self.n_kv_heads))  # [batch, pos, kv_head, d_head]
        q_far = None  # DCA: the queries rotated for keys of the previous chunk and further back
        if self.rope is not None and self.dca is not None:
            q, k, q_far = dca.rotate(q, k, pos.past, self.rope, self.dca, self.d_head)  # hook_rot_q: the intra queries
        elif self.rope is not None:
            rope_dtype = torch.promote_types(q.dtype, torch.float32) if self.rope_wide else q.dtype
            cos, sin = pos.cos_sin(self.rope, self.d_head, rope_dtype)  # [batch, pos, rotary_dim]
            q = apply_rope(q, cos, sin, self.rope.interleaved).to(q.dtype)
            k = apply_rope(k, cos, sin, self.rope.interleaved).to(k.dtype)
        q, k = self.hook_rot_q(q), self.hook_rot_k(k)

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, head, pos, d_head]
        if q_far is not None:
            q, k, q_far = dca.tempered(q, k, tuple(x.transpose(1, 2) for x in q_far), self.dca, pos)
        if cache is not None:
            k, v = cache.update(self, k, v)  # [batch, kv_head, past + pos, d_head]
        scale = self.scale * self.logit_scale
        # half-precision sink layers take transformers' eager arithmetic (bitwise equal), by row blocks when long
        eager_sinks = self.sinks is not None and q.dtype.itemsize < 4
        if (self.row_statistics is not None and not self.wants_pattern_hook()
                and attention_chunks.fusable(self, q, q_far)):
            z = attention_chunks.fused_statistics(self, q, k, v, pos, scale)
        elif self.pattern_chunks is not None or ((self.softcap is not None or eager_sinks) and not self.wants_pattern_hook()
                                               and attention_chunks.too_long(pos.q_len, pos.k_len)):
            z = attention_chunks.chunked_explicit(self, q, q_far, k, v, pos, scale)
        elif self.wants_pattern() or (self.fp32_scores and q.dtype.itemsize < 4) or eager_sinks:
            attention_chunks.check_pattern_size(self, pos.q_len, pos.k_len)
            z = self._explicit(q, k, v, pos, scale, q_far)
        elif q_far is not None:
            k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
            z = dca.chunked_attention(q, q_far, k, v, self.dca, pos.past, scale, self.sinks)
        else:
            z = self._sdpa(q, k, v, pos, scale)
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]
        if self.use_attn_result:
            return self._sum_of_results(z, out_norm)
        out = self.o_proj(z.reshape(b, p, self.n_heads * self.d_head))  # [batch, pos, d_model]
        return self._scaled(out if out_norm is None else out_norm(out))

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.residual_scale is None else out * self.residual_scale

    def _project(self, linear: nn.Linear, x: torch.Tensor, n: int, norm: str | None = None) -> torch.Tensor:
        """-> [batch, pos, n, d_head], through the q/k norm `norm` when the family has one. Per-head inputs
        [batch, pos, n, d_model] (split-qkv) meet only their head's rows."""
        if x.dim() == 3:
            out = linear(x)  # [batch, pos, n * d_head]
        else:
            out = torch.einsum("bpnm,ndm->bpnd", x, linear.weight.view(n, self.d_head, -1)).flatten(-2)
            out = out if linear.bias is None else out + linear.bias
        if norm is not None and self.qk_norm == "full":
            out = getattr(self, norm)(out)
        out = out.view(*out.shape[:-1], n, self.d_head)
        if norm is not None and self.qk_norm == "head":
            out = getattr(self, norm)(out)
        return out

    def _sum_of_results(self, z: torch.Tensor, out_norm: RMSNorm | None) -> torch.Tensor:
        """Attention output as the sum of hook_result [batch, pos, head, d_model], each head's write to the residual
        stream. Under a post-norm a head's result is its share of the normed output (scaled by the norm of the summed
        output), so results still sum to hook_attn_out; a patched result enters at that cached scale."""
        result = torch.einsum("bphd,hdm->bphm", z, self.W_O)  # [batch, pos, head, d_model]
        bias = self.o_proj.bias
        if out_norm is None:
            out = self.hook_result(self._scaled(result)).sum(-2)  # a head's write, residual multiplier included
            return out if bias is None else out + self._scaled(bias)
        if bias is not None:
            raise ValueError(f"{self.hook_z.name.rsplit('.', 1)[0]}: o_proj's bias passes through the post-attention norm, so per-head "
                             "results plus b_O cannot sum to the attention output")
        out = out_norm.hook_normalized(self.hook_result(out_norm.split(result, result.sum(-2))).sum(-2))
        return self._scaled(out)

    @property
    def _result_contribution_scale(self) -> float:
        """Read by TransformerLens' ActivationCache when it rebuilds head results as z @ W_O (hook_result not cached)."""
        if self.output_normed:
            raise ValueError(f"{self.hook_z.name.rsplit('.', 1)[0]}: the attention output is RMS-normalised (ln1_post), so z @ W_O is "
                             "not a head's contribution; run with model.set_use_attn_result(True) to cache exact hook_result")
        return 1.0 if self.residual_scale is None else self.residual_scale

    def _alibi_bias(self, pos: Positions, dtype: torch.dtype) -> torch.Tensor:
        """[1, head, q_pos, k_pos]: slope_h * (j - i), added to the scores.

        Computed in float32, or in float64 from exact slopes for a float64 model; slopes come from the formula on each
        call (no buffer), so `.to(bf16)` cannot round them and float64 runs carry no float32 rounding.
        """
        device = pos.positions.device
        compute = torch.promote_types(dtype, torch.float32)
        q_idx = torch.arange(pos.past, pos.k_len, device=device)
        k_idx = torch.arange(pos.k_len, device=device)
        rel = (k_idx[None, :] - q_idx[:, None]).to(compute)  # [q, k]
        slopes = alibi_slopes(self.n_heads, dtype=compute).to(device)  # [head]
        return (slopes[:, None, None] * rel).to(dtype)[None]

    def _sdpa(self, q, k, v, pos: Positions, scale: float) -> torch.Tensor:
        if self.sinks is not None:
            return self._sdpa_with_sinks(q, k, v, pos, scale)
        alibi = self.positional == "alibi"
        if not alibi and not pos.needs_mask(self.window):
            is_causal = pos.q_len > 1
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=self.n_rep > 1)
        mask = pos.mask(self.window)  # [batch or 1, 1, q, k] bool
        if alibi:
            mask = self._alibi_bias(pos, q.dtype).masked_fill(~mask, float("-inf"))
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def _sdpa_with_sinks(self, q, k, v, pos: Positions, scale: float) -> torch.Tensor:
        """SDPA over the real keys (the fused kernel that also returns their log-sum-exp, dca.attend_with_lse), scaled
        by the mass a sink leaves them: equal to the explicit path's softmax with the sink column."""
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)  # [batch, head, k_pos, d_head]
        allowed = pos.mask(self.window) if pos.needs_mask(self.window) else None  # [batch or 1, 1, q, k]
        causal = 0 if allowed is None and pos.q_len > 1 else None
        out, lse = dca.attend_with_lse(q, k, v, scale, causal_offset=causal, allowed=allowed)  # [b, h, q, d], [b, h, q]
        return (out * sink_factor(lse, self.sinks).to(out.dtype)).to(q.dtype)

    def _explicit(self, q, k, v, pos: Positions, scale: float, q_far=None) -> torch.Tensor:
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)  # [batch, head, k_pos, d_head]
        if q_far is not None:  # DCA: each key scored by the query of its part (intra, previous chunk, further back)
            scores = dca.dca_scores(q, q_far, k, self.dca, pos.past, scale)  # [batch, head, q_pos, k_pos]
        elif self.fp32_scores:  # GPT-Neo / GPT-J: q·k in float32 even for half-precision models
            wide = torch.promote_types(q.dtype, torch.float32)
            scores = (q.to(wide) @ k.to(wide).transpose(-1, -2)) * scale  # [batch, head, q_pos, k_pos]
        else:
            scores = (q @ k.transpose(-1, -2)) * scale  # [batch, head, q_pos, k_pos]
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if self.positional == "alibi":
            scores = scores + self._alibi_bias(pos, scores.dtype)
        if pos.q_len > 1 or pos.needs_mask(self.window):
            scores = scores.masked_fill(~pos.mask(self.window), float("-inf"))
        scores = self.hook_attn_scores(scores)
        # softmax in at least float32 (like transformers' eager path), in float64 for float64 models (like SDPA)
        softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
        pattern = self.hook_pattern(attention_softmax(scores, self.sinks, softmax_dtype).to(q.dtype))  # [batch, head, q_pos, k_pos]
        return pattern @ v  # [batch, head, q_pos, d_head]


class MLP(MLPWeights, nn.Module):
    """Gated MLP down(act(gate(x)) * up(x)) (SwiGLU, GeGLU), or plain down(act(up(x))) (GPT-2, GPT-NeoX, OPT, BLOOM)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gated = cfg.mlp == "gated"
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.act]
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp], gate projection (plain: up projection, before act)
        self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp], up projection (gated only)
        self.hook_post = HookPoint()  # [batch, pos, d_mlp], act(gate) * up (plain: act(up))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.down_proj(self.hook_post(self.act(self.hook_pre(self.up_proj(x)))))
        gate = self.hook_pre(self.gate_proj(x))  # [batch, pos, d_mlp]
        up = self.hook_pre_linear(self.up_proj(x))  # [batch, pos, d_mlp]
        return self.down_proj(self.hook_post(self.act(gate) * up))


def make_mlp(cfg: DecoderConfig, layer: int) -> nn.Module:
    """The MLP half of block `layer`: dense, or a mixture of experts (model/moe.py) for `cfg.sparse_layers`."""
    if cfg.is_sparse(layer):
        from .moe import MoE  # moe.py builds its experts from this module's pieces

        return MoE(cfg)
    return MLP(cfg)


class Block(nn.Module):
    """One decoder block; the family's layout is data (cfg fields), never a branch on the family's name:

        pre-norm (Llama):           h = x + attn(ln1(x));            out = h + mlp(ln2(h))
        + post_norms (Gemma 2/3):   h = x + ln1_post(attn(ln1(x)));   out = h + ln2_post(mlp(ln2(h)))
        post_norms only (OLMo 2):   h = x + ln1_post(attn(x));        out = h + ln2_post(mlp(h))
        residual_norm (OPT-350m):   h = ln1(x + attn(x));             out = ln2(h + mlp(h))
        parallel (GPT-NeoX, GPT-J): h = x + attn(ln1(x));             out = h + mlp(ln2(x))  (shared_norm: mlp(ln1(x)))
    Granite's residual_scale multiplies each half's output before the add (hook_attn_out / hook_mlp_out see the scaled
    output, so the stream stays the sum of what the hooks show; attention applies it itself, so its per-head
    hook_result carries it too). In a parallel block hook_resid_mid is x + attn(...),
    the stream the MLP output is added to (the MLP itself reads x).

    `attn` or `mlp` is None for a block listed in `cfg.removed_attn` / `removed_mlp` (sub-block surgery): that half then
    adds nothing to the residual stream.
    """

    # TransformerLens 4.3's flag (logit_lens, jacobian lens): hook_resid_post is the one [batch, pos, d_model] stream the
    # next block reads and ln_final -> unembed turns into logits, not a stack of streams combined later
    hook_out_is_single_residual_stream = True

    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.parallel, self.shared_norm, self.residual_norm = cfg.parallel, cfg.shared_norm, cfg.residual_norm
        self.pre_norms = cfg.pre_norms and not cfg.residual_norm  # norms on the halves' inputs
        if cfg.pre_norms or cfg.residual_norm:
            self.ln1 = make_norm(cfg)
        self.attn: Attention | None = Attention(cfg, layer) if cfg.has_attn(layer) else None
        if (cfg.pre_norms or cfg.residual_norm) and not cfg.shared_norm:
            self.ln2 = make_norm(cfg)
        self.mlp: nn.Module | None = make_mlp(cfg, layer) if cfg.has_mlp(layer) else None
        if cfg.post_norms:
            self.ln1_post = make_norm(cfg)
            self.ln2_post = make_norm(cfg)
        self.post_norms = cfg.post_norms
        self.residual_scale = cfg.residual_scale
        self.use_split_qkv_input = False  # TransformerLens switches, kept in step with cfg by Decoder.forward
        self.use_attn_in = False
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_in = HookPoint()  # [batch, pos, head, d_model], with use_attn_in only
        self.hook_q_input = HookPoint()  # [batch, pos, head, d_model], with use_split_qkv_input only
        self.hook_k_input = HookPoint()  # [batch, pos, kv_head, d_model], with use_split_qkv_input only
        self.hook_v_input = HookPoint()  # [batch, pos, kv_head, d_model], with use_split_qkv_input only
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_in = HookPoint()  # [batch, pos, d_model], the MLP's input stream (a copy when hooked)
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def _norm_in(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """A half's input: through its pre-norm (ln1 / ln2; ln1 for both in a shared-norm block), or as is."""
        if not self.pre_norms:
            return x
        return getattr(self, "ln1" if self.shared_norm else name)(x)

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.residual_scale is None else out * self.residual_scale

    def forward(self, x: torch.Tensor, pos: Positions, cache: KVCache | None = None) -> torch.Tensor:
        x = self.hook_resid_pre(x)  # [batch, pos, d_model]
        block_in = x
        if self.attn is not None:
            out_norm = self.ln1_post if self.post_norms else None
            if self.use_split_qkv_input or self.use_attn_in:
                q_in, k_in, v_in = self._per_head_inputs(x)
                attn_out = self.attn(q_in, pos, cache, k_in=k_in, v_in=v_in, out_norm=out_norm)
            else:
                attn_out = self.attn(self._norm_in("ln1", x), pos, cache, out_norm=out_norm)
            x = x + self.hook_attn_out(attn_out)  # Granite's residual multiplier is applied inside attention
            if self.residual_norm:
                x = self.ln1(x)
        x = self.hook_resid_mid(x)
        if self.mlp is not None:
            stream = block_in if self.parallel else x
            mlp_in = self.hook_mlp_in(stream.clone()) if hooked(self.hook_mlp_in) else stream  # a copy spares the stream
            mlp_out = self.mlp(self._norm_in("ln2", mlp_in))
            if self.post_norms:
                mlp_out = self.ln2_post(mlp_out)
            x = x + self.hook_mlp_out(self._scaled(mlp_out))
            if self.residual_norm:
                x = self.ln2(x)
        return self.hook_resid_post(x)

    def _per_head_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """TransformerLens' per-head attention inputs, each normed by ln1: queries [batch, pos, head, d_model], keys and
        values [batch, pos, kv_head, d_model]; hook_attn_in (one slot per head) feeds all three when use_attn_in is on."""
        h, kvh = self.attn.n_heads, self.attn.n_kv_heads
        if self.use_attn_in:
            attn_in = self.hook_attn_in(repeat_heads(x, h))  # [batch, pos, head, d_model]; h == kvh (checked)
            if not self.use_split_qkv_input:
                normed = self._norm_in("ln1", attn_in)
                return normed, normed, normed
            q_in, k_in, v_in = attn_in, attn_in.clone(), attn_in.clone()
        else:
            q_in, k_in, v_in = repeat_heads(x, h), repeat_heads(x, kvh), repeat_heads(x, kvh)
        q_in, k_in, v_in = self.hook_q_input(q_in), self.hook_k_input(k_in), self.hook_v_input(v_in)
        return self._norm_in("ln1", q_in), self._norm_in("ln1", k_in), self._norm_in("ln1", v_in)

    @property
    def residual_contribution_scale(self) -> float:
        """Read by TransformerLens' ActivationCache when it splits an MLP output into neurons as post * W_out."""
        if self.post_norms or self.residual_norm:
            raise ValueError("the MLP output is normalised (ln2_post, or a post-LN block), so post * W_out is not a "
                             "neuron's contribution; use decompose_resid / get_full_resid_decomposition(expand_neurons=False)")
        return 1.0 if self.residual_scale is None else self.residual_scale


# ---------------------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------------------
class Decoder(DecoderWeights, HookedRootModule):
    """A decoder-only LM with TransformerLens hook points and TransformerLens's calling conventions.

    `model(input)` takes token ids [batch, pos] (or [pos]), a string or a list of strings and returns logits
    [batch, pos, vocab]; `return_type="loss" | "both" | None`, `start_at_layer` / `stop_at_layer` as in TransformerLens.
    """

    def __init__(self, cfg: DecoderConfig, tokenizer=None, *, source: str | None = None):
        super().__init__()
        self.source = source  # what it was loaded from (folder, GGUF file or alias), recorded in exports
        self.layer_origin: list[int] = list(range(cfg.n_layers))  # original index of each block (changes on removal)
        self.n_layers_original = cfg.n_layers  # layer count before any removal
        self.offload = None  # a BlockStore when the blocks stay on disk (load_model(..., offload=True))
        self.embed = Embed(cfg.d_vocab, cfg.d_embedding)
        if cfg.d_embed is not None:  # OPT-350m: narrow embeddings projected into the stream
            self.embed_proj = nn.Linear(cfg.d_embed, cfg.d_model, bias=False)
        if cfg.positional == "learned":
            self.pos_embed = PosEmbed(cfg.max_position_embeddings + cfg.pos_offset, cfg.d_model, cfg.pos_offset)
        if cfg.embed_norm:  # BLOOM normalises the embeddings before the first block
            self.ln_embed = make_norm(cfg)
        self.hook_tokens = HookPoint()  # [batch, pos]; fires only with cfg.use_hook_tokens
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.hook_pos_embed = HookPoint()  # [batch, pos, d_model], learned positions only
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = make_norm(cfg) if cfg.final_norm else NoNorm(cfg.d_model)
        self.unembed = Unembed(cfg.d_embedding, cfg.d_vocab, norm_head=cfg.norm_head, softcap=cfg.final_softcap,
                               bias=cfg.unembed_bias, divisor=cfg.logit_divisor,
                               d_model=cfg.d_model if cfg.d_embed is not None else None)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.tie_weights()
        self.setup()

    def tie_weights(self) -> None:
        """With tied embeddings the unembedding IS the embedding matrix (re-done after `to_empty`, which unties)."""
        if self.cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight

    # ---- state the config reports (cfg.device, cfg.dtype, cfg.tokenizer_prepends_bos, ...) ---------------------------
    @property
    def cfg(self) -> DecoderConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: DecoderConfig) -> None:
        old = self.__dict__.get("_cfg")
        if old is not None and old is not cfg:
            cfg.live = dataclasses.replace(old.live)  # surgery swaps configs: the model's device and tokenizer stay
        self.__dict__["_cfg"] = cfg
        self._sync_cfg()

    @property
    def tokenizer(self):
        return self.__dict__.get("_tokenizer")

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self.__dict__["_tokenizer"] = tokenizer
        self._sync_cfg()

    def _sync_cfg(self) -> None:
        live, tok = self.cfg.live, self.tokenizer
        live.device, live.dtype = self.embed.weight.device, self.embed.weight.dtype
        live.tokenizer_prepends_bos = tok is not None and tokenizing.prepends_bos(tok)
        live.tokenizer_appends_eos = tok is not None and tokenizing.appends_eos(tok)
        live.model_name = self.__dict__.get("source")

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._sync_cfg()
        return self

    # ---- forward -------------------------------------------------------------------------------------------------
    def forward(
        self,
        input: torch.Tensor | str | list[str],
        return_type: str | None = "logits",
        *,
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        tokens: torch.Tensor | None = None,
        logits_to_keep: int | None = None,
    ):
        """input: token ids [batch, pos] or [pos], a string or a list of strings (tokenised by `to_tokens`, with
        `prepend_bos` / `padding_side`) -> logits [batch, pos, vocab], or what `return_type` asks for: "loss" (mean
        next-token cross-entropy; [batch, pos - 1] with `loss_per_token`), "both" (logits, loss) or None.

        attention_mask [batch, pos] (1 = token, 0 = padding, left or right): padded keys are hidden and positions count
        only real tokens, so a padded row equals the unpadded sequence. Without it, ids whose rows start with the pad
        token get the mask inferred (TransformerLens's get_attention_mask) when the padding side is known to be left
        (`padding_side="left"` or `tokenizer.padding_side == "left"`), and are refused otherwise; but where the pad id
        is shared with BOS / EOS (the EOS fallback), only ids `to_tokens` padded or a call's `padding_side="left"` are
        read as padded, other ids are taken as they are (a BOS then a separator is not padding). With `kv_cache`, pass
        the mask of the new tokens only. `start_at_layer=L`: input is the residual stream [batch, pos, d_model] entering
        block L (pass `tokens` for a loss). `stop_at_layer=L`: returns the residual stream entering block L.
        `logits_to_keep=n` (return_type "logits"): only the last n positions go through the final norm and unembedding,
        logits [batch, n, vocab], as transformers' generation does (a 16k-token prompt's full logits are 3 GB for a
        49k vocabulary).
        """
        if return_type not in RETURN_TYPES:
            if isinstance(return_type, torch.Tensor):
                raise TypeError("attention_mask is keyword-only: model(ids, attention_mask=mask)")
            raise InputError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
        if logits_to_keep is not None and (return_type != "logits" or isinstance(logits_to_keep, bool)
                                           or not isinstance(logits_to_keep, int) or logits_to_keep < 1):
            raise InputError(f"logits_to_keep must be an int >= 1 with return_type='logits', got {logits_to_keep!r} "
                             f"with return_type={return_type!r}")
        past = kv_cache.length if kv_cache is not None else 0
        tokenizing.check_layer_arg("stop_at_layer", stop_at_layer, len(self.blocks))
        self._apply_switches()
        if start_at_layer is None:
            ids, attention_mask = self._input_ids(input, attention_mask, prepend_bos, padding_side, past)  # [batch, pos]
            if self.cfg.use_hook_tokens:
                ids = self.hook_tokens(ids)
            x = self.hook_embed(self._embed(ids))  # [batch, pos, d_model]
            pos = self._positions(x.shape[:2], x.device, attention_mask, position_ids, kv_cache)
            x = self._add_positions(x, pos)
        else:
            x, ids = self._resid_input(input, start_at_layer), tokens  # [batch, pos, d_model]
            pos = self._positions(x.shape[:2], x.device, attention_mask, position_ids, kv_cache)
        with self._blocks(start_at_layer, stop_at_layer) as blocks:
            for block in blocks:
                x = block(x, pos, kv_cache)
        if kv_cache is not None:
            kv_cache.length += x.shape[1]
        if stop_at_layer is not None:
            return x  # [batch, pos, d_model]
        if return_type is None:
            return None
        if logits_to_keep is not None:
            x = x[:, -logits_to_keep:]  # [batch, n, d_model]
        logits = self.unembed_residual(self.ln_final(x))  # [batch, pos, vocab]
        if return_type == "logits":
            return logits
        if ids is None:
            raise InputError("return_type='loss' with start_at_layer needs the token ids: pass tokens=[batch, pos]")
        loss = self.loss_fn(logits, ids, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    @contextlib.contextmanager
    def _blocks(self, start: int | None, stop: int | None):
        """The blocks a forward runs; streamed from disk one at a time when the model is offloaded (closed on error,
        so a failing forward frees the block it was in)."""
        if self.offload is None:
            yield self.blocks[start:stop]
            return
        from .offload import streamed_blocks

        with contextlib.closing(streamed_blocks(self, start, stop)) as blocks:
            yield blocks

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # [batch, pos, d_embedding]
        if self.cfg.d_embed is not None:
            x = self.embed_proj(x)  # [batch, pos, d_model]
        if self.cfg.embed_scale is not None:
            # rounded straight to the model dtype, like transformers' buffer (bf16: sqrt(3072) -> 55.5; fp64: exact);
            # Granite multiplies by the Python number
            scale = self.cfg.embed_scale
            x = x * (torch.tensor(scale, dtype=x.dtype) if self.cfg.embed_scale_rounded else scale)
        if self.cfg.embed_norm:
            # BLOOM's word_embeddings_layernorm, before hook_embed: what hook_embed shows is what enters the stream, so
            # decompositions (embed + attention and MLP outputs) still sum to the residual stream
            x = self.ln_embed(x)
        return x

    def _add_positions(self, x: torch.Tensor, pos: Positions) -> torch.Tensor:
        """The stream entering block 0: token embedding (+ learned position embedding)."""
        if self.cfg.positional == "learned":
            x = x + self.hook_pos_embed(self.pos_embed(pos.positions))  # [batch, pos, d_model]
        return x

    def _input_ids(self, input, attention_mask, prepend_bos, padding_side, past) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids [batch, pos] and the attention mask to use: strings are tokenised (their mask is known), ids are
        checked, and their left padding is masked when the padding side is known (else refused, see `forward`)."""
        if isinstance(input, (str, list, tuple)):
            if attention_mask is not None:
                raise InputError("attention_mask goes with token ids; for text input the mask comes from to_tokens")
            ids, mask = self._tokenize(input, prepend_bos, padding_side)
            return ids, (mask if not bool(mask.all()) else None)
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be token ids, a string or a list of strings, got {type(input).__name__}")
        ids = input[None] if input.dim() == 1 else input  # [batch, pos]
        tok = self.tokenizer
        pad = tokenizing.pad_token_id(tok) if attention_mask is None and past == 0 else None
        rows_starting_with_pad = tokenizing.check_ids(ids, self.cfg.d_vocab, pad)
        if not rows_starting_with_pad or not tokenizing.leading_pad_is_padding(ids, tok, padding_side == "left"):
            return ids, attention_mask  # a leading BOS / EOS that shares the pad id is a token, not padding
        mask = tokenizing.left_padding_mask(ids, pad, bos_is_pad=tokenizing.bos_token_id(tok) == pad,
                                        prepend_bos=self.cfg.default_prepend_bos)  # [batch, pos]
        if bool(mask.all()):
            return ids, None  # what looked like padding is the BOS that shares the pad id
        if (padding_side or getattr(tok, "padding_side", None)) == "left":
            return ids, mask
        raise InputError(f"input: {rows_starting_with_pad} row(s) start with the pad token (id {pad}) and no attention_mask "
                         "was given; pass attention_mask=, or padding_side='left' to mask leading pad tokens")

    def _resid_input(self, resid: torch.Tensor, start_at_layer: int) -> torch.Tensor:
        if not -len(self.blocks) <= start_at_layer <= len(self.blocks):
            raise InputError(f"start_at_layer={start_at_layer} out of range for {len(self.blocks)} layers")
        if not isinstance(resid, torch.Tensor) or resid.dim() != 3 or resid.shape[-1] != self.cfg.d_model:
            shape = tuple(resid.shape) if isinstance(resid, torch.Tensor) else type(resid).__name__
            raise InputError(f"with start_at_layer, input is the residual stream [batch, pos, {self.cfg.d_model}], got {shape}")
        return resid

    def unembed_residual(self, normed: torch.Tensor) -> torch.Tensor:
        """Logits [batch, pos, vocab] from the final-normed residual stream (NormHead and soft-capping included)."""
        return self.unembed(normed)

    # ---- TransformerLens switches for opt-in hooks -----------------------------------------------------------------
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Per-head results blocks.{i}.attn.hook_result [batch, pos, head, d_model] (costs a head-sized einsum)."""
        self.cfg.use_attn_result = bool(use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Separate residual-stream copies per head for queries, keys and values: blocks.{i}.hook_q_input / hook_k_input /
        hook_v_input, so a patch can reach one head's queries alone."""
        self.cfg.use_split_qkv_input = bool(use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """One residual-stream copy per head, blocks.{i}.hook_attn_in [batch, pos, head, d_model], feeding q, k and v."""
        if use_attn_in and self.cfg.n_kv_heads != self.cfg.n_heads:
            raise ValueError(f"use_attn_in gives each of the {self.cfg.n_heads} query heads an input, which cannot feed "
                             f"{self.cfg.n_kv_heads} KV heads; use set_use_split_qkv_input(True)")
        self.cfg.use_attn_in = bool(use_attn_in)

    def set_use_hook_tokens(self, use_hook_tokens: bool) -> None:
        """hook_tokens [batch, pos] on the input ids."""
        self.cfg.use_hook_tokens = bool(use_hook_tokens)

    def set_use_expert_outputs(self, use_expert_outputs: bool) -> None:
        """Mixture-of-experts layers: per-expert outputs blocks.{i}.mlp.experts.{e}.hook_out and the shared expert's
        blocks.{i}.mlp.hook_shared_out [batch, pos, d_model], which sum to the MLP output (model/moe.py)."""
        for block in self.blocks:
            if block.mlp is not None and hasattr(block.mlp, "use_expert_outputs"):
                block.mlp.use_expert_outputs = bool(use_expert_outputs)

    def _apply_switches(self) -> None:
        """Copy cfg's switches to the modules (users set them on cfg directly, as in TransformerLens); a few attribute
        reads per block when nothing changed."""
        attn_result, split, attn_in = self.cfg.use_attn_result, self.cfg.use_split_qkv_input, self.cfg.use_attn_in
        if attn_in and self.cfg.n_kv_heads != self.cfg.n_heads:
            self.set_use_attn_in(True)  # raises the one-line explanation
        for block in self.blocks:
            if block.use_split_qkv_input != split or block.use_attn_in != attn_in:
                block.use_split_qkv_input, block.use_attn_in = split, attn_in
            if block.attn is not None and block.attn.use_attn_result != attn_result:
                block.attn.use_attn_result = attn_result

    @staticmethod
    def loss_fn(logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                per_token: bool = False) -> torch.Tensor:
        """TransformerLens's next-token cross-entropy: logits [batch, pos, vocab], tokens [batch, pos] -> mean loss, or
        [batch, pos - 1] with `per_token`. Positions whose token or next token is masked out count as 0 and are left out
        of the mean."""
        return next_token_loss(logits, tokens, attention_mask, per_token)

    def _positions(self, shape, device, attention_mask, position_ids, kv_cache) -> Positions:
        past = kv_cache.length if kv_cache is not None else 0
        b, p = shape
        key_valid = None
        if kv_cache is not None and (attention_mask is not None or kv_cache.attention_mask is not None):
            new = attention_mask if attention_mask is not None else torch.ones(b, p, dtype=torch.long, device=device)
            old = kv_cache.attention_mask
            if old is None:
                old = torch.ones(b, past, dtype=new.dtype, device=new.device)
            attention_mask = torch.cat((old, new.to(old.dtype)), dim=1)  # [batch, past + pos]
            kv_cache.attention_mask = attention_mask
        if attention_mask is not None:
            if attention_mask.shape != (b, past + p):
                raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, past + p)}")
            key_valid = attention_mask.bool()
            if bool(key_valid.all()):
                key_valid = None
        if position_ids is not None:
            position_ids = tokenizing.check_position_ids(position_ids, b, p)  # [batch, pos]
        else:
            if attention_mask is not None:
                # count only real tokens, like transformers' generate: position = (number of real tokens before) - 1
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + p, device=device).expand(b, p)
        return Positions(positions=position_ids, key_valid=key_valid, past=past)

    # ---- TransformerLens entry points with a cache or hooks ------------------------------------------------------
    def run_with_cache(self, *model_args, names_filter=None, return_cache_object: bool = True,
                       remove_batch_dim: bool = False, incl_bwd: bool = False, **kwargs):
        """TransformerLens's run_with_cache: (output, ActivationCache). `names_filter`: a hook name, a list of names or a
        predicate; names that are not hooks of this model are refused. `incl_bwd=True` back-propagates the output, so it
        needs `return_type="loss"`."""
        self._check_names_filter(names_filter)
        if incl_bwd and kwargs.get("return_type", "logits") != "loss":
            raise InputError("incl_bwd=True back-propagates the output: pass return_type='loss' (a scalar)")
        out, cache = super().run_with_cache(*model_args, names_filter=names_filter, remove_batch_dim=remove_batch_dim,
                                            incl_bwd=incl_bwd, **kwargs)
        if return_cache_object:
            cache = ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache

    def _check_names_filter(self, names_filter) -> None:
        names = [names_filter] if isinstance(names_filter, str) else names_filter
        if names is None or callable(names):
            return
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise InputError(f"names_filter must be a hook name, a list of hook names or a function, got {names_filter!r}")
        unknown = [n for n in names if n not in self.hook_dict]
        if unknown:
            raise InputError(f"names_filter: {unknown[0]!r} is not a hook of this model"
                             + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                             + f"; hooks are named like {next(iter(self.hook_dict))!r} (see model.hook_dict)")

    # ---- generation ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        input: torch.Tensor | str | list[str] = "",
        max_new_tokens: int = 20,
        stop_at_eos: bool = True,
        eos_token_id: int | list[int] | None = None,
        do_sample: bool = False,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        *,
        use_cache: bool = True,
        use_past_kv_cache: bool | None = None,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        return_type: str = "input",
        verbose: bool = False,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | str | list[str]:
        """Greedy (default) or sampled continuation with a KV cache.

        input: token ids [batch, pos], a string or a list of strings (padded on the left, so every row continues from
        its last real token). return_type: "tokens" (ids [batch, pos + new]), "str" (the decoded text, prompt included,
        without the BOS `to_tokens` added), or "input" (whatever came in). Rows that hit EOS are padded with EOS
        afterwards (`stop_at_eos=False` ignores EOS). Without `use_cache` (TransformerLens: `use_past_kv_cache`) every
        step recomputes the whole sequence (same tokens).
        """
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        if return_type not in ("input", "str", "tokens"):
            raise InputError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
        use_cache = use_cache if use_past_kv_cache is None else use_past_kv_cache
        text_in = isinstance(input, (str, list, tuple))
        if text_in:
            ids, attention_mask = self._tokenize(input, prepend_bos, padding_side or "left")  # [batch, pos]
        else:
            ids, attention_mask = self._input_ids(input, attention_mask, None, padding_side, 0)
        eos = eos_token_id if eos_token_id is not None else self.cfg.eos_token_id
        eos = ([eos] if isinstance(eos, int) else list(eos or [])) if stop_at_eos else []
        eos = torch.tensor(eos, dtype=torch.long, device=ids.device)  # [n_eos]
        cache = KVCache() if use_cache else None
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)  # [batch]
        mask, step_input, step_mask = attention_mask, ids, attention_mask
        switches = self._rope_switch_lengths() if use_cache else set()
        for _ in tqdm(range(max_new_tokens), desc="generate", disable=not verbose, leave=False):
            if use_cache:
                if cache.length and any(cache.length <= s < ids.shape[1] for s in switches):
                    # the cached keys were rotated with the other LongRoPE factors: recompute the whole sequence once,
                    # as transformers' Phi-3 generation does
                    cache, step_input, step_mask = KVCache(), ids, mask
                logits = self(step_input, attention_mask=step_mask, kv_cache=cache, logits_to_keep=1)[:, -1]  # [batch, vocab]
            else:
                logits = self(ids, attention_mask=mask, logits_to_keep=1)[:, -1]  # [batch, vocab]
            nxt = self._choose(logits.float(), do_sample, temperature, top_k, top_p, generator)  # [batch]
            if eos.numel():
                nxt = torch.where(done, eos[0], nxt)
                done |= torch.isin(nxt, eos)
            ids = torch.cat((ids, nxt[:, None]), dim=1)  # [batch, pos + 1]
            if mask is not None:
                mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            step_input, step_mask = nxt[:, None], (None if mask is None else torch.ones_like(mask[:, :1]))
            if eos.numel() and bool(done.all()):
                break
        if return_type == "tokens" or (return_type == "input" and not text_in):
            return ids
        masks = mask if mask is not None else [None] * len(ids)
        texts = [self._decode_generated(row, m) for row, m in zip(ids, masks)]
        return texts[0] if isinstance(input, str) else texts

    def _rope_switch_lengths(self) -> set[int]:
        """Lengths past which a layer's RoPE frequencies change (LongRoPE: its original window)."""
        return {a.rope.original_max_position_embeddings for a in self._attention(None)
                if a.rope is not None and a.rope.rope_type == "longrope"}

    def _decode_generated(self, row: torch.Tensor, mask: torch.Tensor | None) -> str:
        """One generated row as text: padding dropped, and the BOS in front (if any) left out, as TransformerLens does."""
        ids = row[mask.bool()] if mask is not None else row
        if len(ids) and int(ids[0]) == tokenizing.bos_token_id(self.tokenizer) and self.cfg.default_prepend_bos:
            ids = ids[1:]
        return self._need_tokenizer().decode(ids.tolist())

    @staticmethod
    def _choose(logits, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
        if not do_sample or temperature == 0:  # temperature 0 is greedy, as in TransformerLens
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    # ---- structure: what analyses and surgery may ask and change --------------------------------------------------
    def attention_layers(self) -> list[int]:
        """Indices of the blocks that have an attention half (all but those removed by sub-block surgery)."""
        return [i for i, b in enumerate(self.blocks) if b.attn is not None]

    def mlp_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.mlp is not None]

    def keep_blocks(self, indices) -> None:
        """Keep only the blocks at `indices` (current numbering, ascending), in place: config, layer origin and hook
        names follow. Each kept attention keeps its run-time positional settings and its configured defaults."""
        keep = sorted(indices)
        if not keep or len(set(keep)) != len(keep) or not all(0 <= i < len(self.blocks) for i in keep):
            raise InputError(f"keep_blocks: need distinct indices in 0..{len(self.blocks) - 1}, got {list(indices)}")
        new_index = {old: new for new, old in enumerate(keep)}
        self.cfg = self.cfg.replace(
            n_layers=len(keep),
            layer_types=[self.cfg.layer_types[i] for i in keep],
            removed_attn=tuple(new_index[i] for i in self.cfg.removed_attn if i in new_index),
            removed_mlp=tuple(new_index[i] for i in self.cfg.removed_mlp if i in new_index),
            no_rope=tuple(new_index[i] for i in self.cfg.no_rope if i in new_index),
            sparse_layers=tuple(new_index[i] for i in self.cfg.sparse_layers if i in new_index),
        )
        self.blocks = nn.ModuleList(self.blocks[i] for i in keep)
        self.blocks.training = self.training  # a new container starts in training mode; TL's patching checks it
        self.layer_origin = [self.layer_origin[i] for i in keep]
        self.setup()

    def remove_sublayers(self, *, attn=(), mlp=()) -> None:
        """Remove the attention half of the `attn` blocks and the MLP half of the `mlp` blocks, in place."""
        for part, layers in (("attn", list(attn)), ("mlp", list(mlp))):
            for i in layers:
                if not 0 <= i < len(self.blocks) or getattr(self.blocks[i], part) is None:
                    raise InputError(f"{part}: layer {i} has no {part} to remove")
                setattr(self.blocks[i], part, None)
        self.cfg = self.cfg.replace(
            removed_attn=tuple(sorted({*self.cfg.removed_attn, *attn})),
            removed_mlp=tuple(sorted({*self.cfg.removed_mlp, *mlp})),
        )
        self.setup()

    def save_pretrained(self, out_dir, *, force: bool = False, pruning_info: dict | None = None):
        """Write this model as a Hugging Face checkpoint folder (see `residscope.model.export`); returns the folder."""
        return export.save_pretrained(self, out_dir, force=force, pruning_info=pruning_info)

    # ---- run-time positional knobs -------------------------------------------------------------------------------
    def _attention(self, layers) -> list[Attention]:
        """The attention modules of `layers` (an index, indices, or None for all); blocks without attention are skipped."""
        idx = range(len(self.blocks)) if layers is None else ([layers] if isinstance(layers, int) else list(layers))
        out = []
        for i in idx:
            if not 0 <= i < len(self.blocks):
                raise InputError(f"layers: layer {i} out of range (model has {len(self.blocks)} layers)")
            if self.blocks[i].attn is not None:
                out.append(self.blocks[i].attn)
        return out

    def rope_settings(self) -> list[RopeParams | None]:
        """Current RoPE setting per block (None: no attention, or no RoPE)."""
        return [b.attn.rope if b.attn is not None else None for b in self.blocks]

    def windows(self) -> list[int | None]:
        """Current sliding window per block (None: full causal attention, or no attention)."""
        return [b.attn.window if b.attn is not None else None for b in self.blocks]

    def logit_scales(self) -> list[float | None]:
        """Current attention-logit multiplier per block (None: no attention)."""
        return [b.attn.logit_scale if b.attn is not None else None for b in self.blocks]

    def set_rope(self, params: RopeParams | None = None, *, layers=None, **changes) -> None:
        """Replace the RoPE setting of some layers (all by default): a full RopeParams, or field changes applied to each
        layer's current one (e.g. `set_rope(theta=5e5)`, `set_rope(rope_type="linear", factor=4)`)."""
        if self.cfg.positional != "rope":
            raise InputError(f"set_rope: this {self.cfg.model_type} model uses {self.cfg.positional!r} positions, not RoPE")
        attns = self._attention(layers)
        nope = [i for i, b in enumerate(self.blocks) if b.attn in attns and b.attn.default_rope is None]
        if nope and layers is not None:
            raise InputError(f"set_rope: layers {nope} apply no rotary position (NoPE layers of this model)")
        for attn in attns:
            if attn.default_rope is None:
                continue  # a NoPE layer stays without positions
            attn.rope = params if params is not None else attn.rope.replace(**changes)  # RopeParams validates itself

    def set_window(self, window: int | None, *, layers=None) -> None:
        """Sliding attention window W (query i sees keys i-W < j <= i) for some layers; None = full causal attention."""
        if window is not None and (isinstance(window, bool) or int(window) != window or window < 1):
            raise InputError(f"window must be a whole number >= 1 or None, got {window!r}")
        chosen = self._attention(layers)
        if window is not None and any(attn.dca is not None for attn in chosen):
            raise InputError("window: these layers use Dual Chunk Attention, which does not combine with a sliding window "
                             "(set_dual_chunk_attention(None) first)")
        for attn in chosen:
            attn.window = None if window is None else int(window)

    def set_attn_logit_scale(self, scale: float, *, layers=None) -> None:
        """Multiply attention logits by `scale` (λ of attention-window extension) before the softmax."""
        if not (math.isfinite(scale) and scale > 0):
            raise InputError(f"scale: attention logit scale must be finite and > 0, got {scale!r}")
        for attn in self._attention(layers):
            attn.logit_scale = float(scale)

    def dual_chunk_settings(self) -> list[dca.DualChunk | None]:
        """Current Dual Chunk Attention setting per block (None: off, or no attention)."""
        return [b.attn.dca if b.attn is not None else None for b in self.blocks]

    def set_dual_chunk_attention(self, chunk_size: int | None, local_size: int | None = None,
                                 original_max_position_embeddings: int | None = None, *, layers=None) -> None:
        """Dual Chunk Attention (model/dca.py) on some layers (all by default): keys at j % (chunk_size - local_size),
        queries at three positions by how far back the key's chunk lies; with `original_max_position_embeddings`,
        Qwen2.5-1M's attention temperature past that length. Combines with any `set_rope` scaling (DCA + YaRN);
        `chunk_size=None` turns it off. Restored by `positional_overrides()` / `reset_positional()`."""
        if chunk_size is None:
            setting = None
        else:
            if local_size is None:
                raise InputError("local_size: Dual Chunk Attention needs local_size (e.g. chunk_size // 6)")
            setting = dca.DualChunk(chunk_size, local_size, original_max_position_embeddings)
        if setting is not None and self.cfg.positional != "rope":
            raise InputError(f"chunk_size: Dual Chunk Attention remaps RoPE positions, but this model uses {self.cfg.positional!r} "
                             "positions")
        chosen = self._attention(layers)
        for attn in chosen:
            if setting is not None and attn.window is not None:
                raise InputError(f"layers: {attn.hook_z.name.rsplit('.', 2)[0]} uses a sliding window ({attn.window}); "
                                 "Dual Chunk Attention applies to full-attention layers")
        for attn in chosen:
            attn.dca = setting

    def positional_state(self) -> list[dict]:
        return [
            dict(rope=b.attn.rope, window=b.attn.window, logit_scale=b.attn.logit_scale, dca=b.attn.dca)
            if b.attn is not None else {}
            for b in self.blocks
        ]

    def load_positional_state(self, state: list[dict]) -> None:
        for block, s in zip(self.blocks, state, strict=True):
            if block.attn is not None:
                block.attn.rope, block.attn.window, block.attn.logit_scale = s["rope"], s["window"], s["logit_scale"]
                block.attn.dca = s.get("dca", block.attn.default_dca)

    def reset_positional(self) -> None:
        """Back to the configured RoPE, windows, logit scale and Dual Chunk Attention of every layer."""
        for attn in self._attention(None):
            attn.reset_positional()

    @contextlib.contextmanager
    def positional_overrides(self) -> Iterator["Decoder"]:
        """`with model.positional_overrides(): model.set_rope(...)` restores the previous settings on exit."""
        saved = self.positional_state()
        try:
            yield self
        finally:
            self.load_positional_state(saved)

    # ---- conveniences --------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # ---- tokens (TransformerLens's names and semantics; see model/tokens.py) -------------------------------------
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer (load it with load_model(..., load_tokenizer=True) or set "
                             "model.tokenizer)")
        return self.tokenizer

    def _tokenize(self, input: str | list[str], prepend_bos: bool | None, padding_side: str | None,
                  truncate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [batch, pos], mask [batch, pos]) on the model's device; see `to_tokens`."""
        tok = self._need_tokenizer()
        if not isinstance(input, (str, list, tuple)):
            raise InputError(f"input must be a string or a non-empty list of strings, got {type(input).__name__}")
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("input must be a string or a non-empty list of strings")
        rows = tokenizing.encode_rows(
            tok, texts, prepend_bos=self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos,
            tokenizer_bos=self.cfg.tokenizer_prepends_bos, tokenizer_eos=self.cfg.tokenizer_appends_eos,
            max_len=self.cfg.n_ctx if truncate else None)
        if any(not r for r in rows):
            raise InputError(f"input: text {texts[[len(r) for r in rows].index(0)]!r} has no tokens (and no BOS before it)")
        side = padding_side or getattr(tok, "padding_side", None) or "right"
        ids, mask = tokenizing.pad_rows(rows, tokenizing.pad_token_id(tok), side)
        return ids.to(self.device), mask.to(self.device)

    def to_tokens(self, input: str | list[str], prepend_bos: bool | None = None, padding_side: str | None = None,
                  move_to_device: bool = True, truncate: bool = True) -> torch.Tensor:
        """Token ids [batch, pos]. BOS in front when `prepend_bos` (default `cfg.default_prepend_bos`), never twice;
        texts of unequal length padded on `padding_side` (default the tokenizer's, else right) with the pad token;
        cut to `cfg.n_ctx` when `truncate`. A forward on these ids finds left padding by itself when told the side
        (`padding_side="left"`); `model(texts)` knows the mask directly."""
        ids, mask = self._tokenize(input, prepend_bos, padding_side, truncate)
        ids = ids if move_to_device else ids.cpu()
        # a padded batch is remembered, so a forward on these very ids knows its leading pad ids are padding
        return ids if bool(mask.all()) else tokenizing.remember_padded(ids)

    def to_string(self, tokens: torch.Tensor | list | int) -> str | list[str]:
        """Text of ids: [pos], 0-d or a list of ints -> str; [batch, pos] or a list of lists -> list[str]."""
        tok = self._need_tokenizer()
        ids = tokenizing.check_decodable(tokens, tok, self.cfg.d_vocab)
        if ids.dim() == 2:
            return tok.batch_decode(ids.tolist(), clean_up_tokenization_spaces=False)
        if ids.dim() > 2:
            raise InputError(f"to_string takes ids [pos] or [batch, pos], got shape {tuple(ids.shape)}")
        return tok.decode(ids.reshape(-1).tolist(), clean_up_tokenization_spaces=False)

    def to_str_tokens(self, input: str | list | torch.Tensor, prepend_bos: bool | None = None,
                      padding_side: str | None = None) -> list[str] | list[list[str]]:
        """Each token as its own string: for a text (tokenised by `to_tokens`), ids [pos] / [1, pos] / 0-d, or a list of
        either (-> one list per item)."""
        tok = self._need_tokenizer()
        if isinstance(input, list) and not all(isinstance(i, int) for i in input):
            return [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0]
        else:
            ids = tokenizing.check_decodable(input, tok, self.cfg.d_vocab).squeeze()
            if ids.dim() > 1:
                raise InputError(f"to_str_tokens takes one sequence of ids, got shape {tuple(ids.shape)}")
        return tok.batch_decode([[t] for t in ids.reshape(-1).tolist()], clean_up_tokenization_spaces=False)

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (no BOS); refused with the tokens it splits into otherwise."""
        ids = self.to_tokens(string, prepend_bos=False)[0]
        if ids.numel() != 1:
            raise InputError(f"{string!r} is not a single token: it is {ids.numel()} tokens "
                             f"{self.to_str_tokens(ids)} (ids {ids.tolist()})")
        return int(ids[0])

    def to_single_str_token(self, int_token: int) -> str:
        return self.to_str_tokens(torch.tensor([int_token]))[0]

    def get_token_position(self, single_token: str | int, input: str | torch.Tensor, mode: str = "first",
                           prepend_bos: bool | None = None, padding_side: str | None = None) -> int:
        """Position of a token (a one-token string or an id) in a text or in ids [pos] / [1, pos]: its first or last
        occurrence (`mode`)."""
        if mode not in ("first", "last"):
            raise InputError(f"mode must be 'first' or 'last', got {mode!r}")
        ids = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side) if isinstance(input, str) else input
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise InputError(f"get_token_position takes one sequence, got ids of shape {tuple(ids.shape)}")
            ids = ids[0]
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        where = (ids == token).nonzero()[:, 0]  # [matches]
        if not len(where):
            raise InputError(f"token {token} ({self.to_single_str_token(token)!r}) does not occur in the input")
        return int(where[0] if mode == "first" else where[-1])

    def tokens_to_residual_directions(self, tokens: str | int | torch.Tensor) -> torch.Tensor:
        """Unembedding directions in the residual stream before the final norm's gain: [d_model] for one token (a
        one-token string, an id or a 0-d tensor), [..., d_model] for ids [...]. Dotted with a stack passed through
        `ActivationCache.apply_ln_to_stack` they give logits exactly: see `unembed_directions` (ln_final's gain is in
        them, since residscope does not fold norms into W_U; NormHead rows are normalised; soft-capping is refused)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        return self.unembed_directions(tokens)
