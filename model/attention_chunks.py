"""Attention patterns at long lengths, by query chunks: what a hook can see of a pattern when [batch, head, pos, pos]
does not fit in memory (SmolLM2 at 16k tokens: 9 heads x 16k x 16k float32 = 9.7 GB per layer).

- `hook_attn_scores` / `hook_pattern` take the whole pattern, so they are refused once q_pos x k_pos exceeds
  PATTERN_LIMIT^2 (8,192 x 8,192: 2.4 GB per layer for SmolLM2's 9 heads), with a message pointing here.
- `chunked_patterns(model, {layer: fn})` instead hands each attention layer's pattern to `fn(block, first_row)` one
  query chunk at a time: block [batch, head, rows, keys] holds complete rows (softmax over all keys; the keys after the
  block's last query, masked for all its rows, are left out, so keys = first_row + rows), first_row is the query index
  of its first row. The layer's output is computed from the same blocks (block @ v), so nothing larger
  than one block exists; everything the explicit path does (causal and sliding-window masks, padding, ALiBi, soft-capping,
  logit scale, Dual Chunk Attention, gpt-oss's attention sinks) happens per block. With sinks, a block's rows are the
  softmax over real keys plus the sink, sink column dropped (hook_pattern's convention): they sum to 1 - sink mass. `analyses/long_context.py` reduces blocks to statistics.
- A soft-capped layer (which cannot use SDPA) takes this path by itself at long lengths, with no callback.
- `chunked_statistics(model, {layer: fn}, first_k, need)` hands out per-query statistics instead of patterns
  (`RowStats`: attention on the first k keys, and on request the entropy and the mean attended key index). Where the
  scores are scale * q.k plus an additive bias (causal / window / padding mask, ALiBi), they come from the fused
  attention kernel with no pattern at all: the kernel returns the log-sum-exp lse of each query's scores, so
  p_j = exp(s_j - lse) for the first k keys; extra value columns give sum_j p_j j (a column holding j) and
  sum_j p_j k_j (the keys themselves), whence the entropy -sum_j p_j ln p_j = lse - sum_j p_j s_j with
  sum_j p_j s_j = scale * q . sum_j p_j k_j (+ ALiBi's slope * (sum_j p_j j - i)). The kernel needs equal q/k/v widths,
  so q and k are zero-padded to the values' width: sinks alone cost what SDPA costs; the mean distance adds 8 columns,
  the entropy d_head more. Soft-capped or DCA layers fall back to pattern blocks, reduced to the same RowStats.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .errors import InputError

PATTERN_LIMIT = 8192  # positions: hook_pattern / hook_attn_scores are refused when q_pos x k_pos > PATTERN_LIMIT^2
DEFAULT_ROWS = 256  # query rows per block

PatternFn = Callable[[torch.Tensor, int], None]
STATISTICS = ("sinks", "distance", "entropy")


@dataclass
class RowStats:
    """Statistics of the attention of query rows first_row.. (see the module docstring); None where not asked for."""

    first_k: torch.Tensor  # [batch, head, rows, k]: attention on each of the first k keys
    entropy: torch.Tensor | None  # [batch, head, rows]: -sum_j p_j ln p_j (nats)
    mean_key: torch.Tensor | None  # [batch, head, rows]: sum_j p_j j, the attended key index
    mass: torch.Tensor | None = None  # [batch, head, rows]: attention on real keys, 1 - the learned sink's (None: 1)

    @classmethod
    def from_pattern(cls, p: torch.Tensor, first_k: int, need: tuple[str, ...], learned_sink: bool = False) -> "RowStats":
        """From a pattern block [batch, head, rows, keys] whose keys start at 0. With a learned sink (gpt-oss) the rows
        sum to 1 - m: the entropy counts the sink as one more outcome (-m ln m), the distance is over real keys."""
        p = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
        keys = torch.arange(p.shape[-1], device=p.device, dtype=p.dtype)
        entropy = -torch.special.xlogy(p, p).sum(-1) if "entropy" in need else None
        mass = p.sum(-1) if learned_sink else None
        if learned_sink and entropy is not None:
            m = (1 - mass).clamp(min=0)
            entropy = entropy - torch.special.xlogy(m, m)
        return cls(first_k=p[..., :first_k], entropy=entropy, mean_key=p @ keys if "distance" in need else None,
                   mass=mass)


StatsFn = Callable[[RowStats, int], None]


def too_long(q_len: int, k_len: int) -> bool:
    return q_len * k_len > PATTERN_LIMIT * PATTERN_LIMIT


def check_pattern_size(attn, q_len: int, k_len: int) -> None:
    """Refuse a hook on the whole pattern once it would exceed PATTERN_LIMIT^2 entries per head."""
    if attn.wants_pattern_hook() and too_long(q_len, k_len):
        name = attn.hook_z.name.rsplit(".", 1)[0] if attn.hook_z.name else "attention"
        raise InputError(f"{name}.hook_pattern: a [batch, head, {q_len}, {k_len}] pattern is beyond the "
                         f"{PATTERN_LIMIT}x{PATTERN_LIMIT} limit; use residscope.analyses.long_context "
                         "(chunked attention statistics) or model.attention_chunks.chunked_patterns for blocks of rows")


@contextlib.contextmanager
def chunked_patterns(model, fns: dict[int, PatternFn], rows: int = DEFAULT_ROWS) -> Iterator[None]:
    """Inside the block, attention layer i (a block index) delivers its pattern to fns[i] by blocks of `rows` query
    rows (see the module docstring); restored on exit."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise InputError(f"rows must be a whole number >= 1, got {rows!r}")
    attns = {}
    for i in fns:
        if not 0 <= i < len(model.blocks) or model.blocks[i].attn is None:
            raise InputError(f"layers: block {i} has no attention layer")
        attns[i] = model.blocks[i].attn
    saved = {i: a.pattern_chunks for i, a in attns.items()}
    try:
        for i, a in attns.items():
            a.pattern_chunks = (fns[i], rows)
        yield
    finally:
        for i, a in attns.items():
            a.pattern_chunks = saved[i]


@contextlib.contextmanager
def chunked_statistics(model, fns: dict[int, StatsFn], first_k: int, need: tuple[str, ...] = STATISTICS,
                       rows: int = DEFAULT_ROWS) -> Iterator[None]:
    """Inside the block, attention layer i hands RowStats of its queries to fns[i](stats, first_row), by chunks of
    query rows (fused kernel: chunks of 4 x `rows` where a mask is needed, one call for plain causal attention;
    fallback: pattern blocks of `rows` rows). `need` adds "distance" and/or "entropy" to the sinks."""
    unknown = [x for x in need if x not in STATISTICS]
    if unknown:
        raise InputError(f"statistics: unknown {unknown[0]!r} (choose from {', '.join(STATISTICS)})")
    if isinstance(first_k, bool) or not isinstance(first_k, int) or first_k < 1:
        raise InputError(f"first_k must be a whole number >= 1, got {first_k!r}")
    need = tuple(x for x in STATISTICS if x in need)

    def from_blocks(fn: StatsFn, learned_sink: bool) -> PatternFn:  # the fallback: pattern blocks to the same RowStats
        return lambda block, first_row: fn(RowStats.from_pattern(block, first_k, need, learned_sink), first_row)

    sinks = {i: 0 <= i < len(model.blocks) and getattr(model.blocks[i].attn, "sinks", None) is not None for i in fns}
    with chunked_patterns(model, {i: from_blocks(fn, sinks[i]) for i, fn in fns.items()}, rows=rows):
        attns = {i: model.blocks[i].attn for i in fns}
        try:
            for i, a in attns.items():
                a.row_statistics = (fns[i], first_k, need, rows)
            yield
        finally:
            for a in attns.values():
                a.row_statistics = None


def fusable(attn, q: torch.Tensor, q_far) -> bool:
    """True when the layer's scores are scale * q.k plus an additive bias, which the fused kernel computes."""
    return (q_far is None and attn.softcap is None and getattr(attn, "sinks", None) is None and q.device.type == "cpu"
            and q.dtype in (torch.float32, torch.float64) and attn.positional in ("rope", "alibi", "none"))


def _bias(attn, q_idx: torch.Tensor, k_idx: torch.Tensor, key_valid, dtype) -> torch.Tensor:
    """Additive mask [batch | 1, head | 1, rows, keys]: -inf where a key is not attended, ALiBi's slope * (j - i)."""
    from .decoder import alibi_slopes, attention_allowed

    allowed = attention_allowed(q_idx, k_idx, attn.window)[None, None]  # [1, 1, rows, keys]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, k_idx]
        allowed = allowed | (q_idx[:, None] == k_idx[None, :])[None, None]  # a padding query sees itself
    bias = torch.zeros(allowed.shape, dtype=dtype, device=q_idx.device)
    if attn.positional == "alibi":
        rel = (k_idx[None, :] - q_idx[:, None]).to(dtype)  # [rows, keys]
        bias = bias + alibi_slopes(attn.n_heads, dtype=dtype).to(q_idx.device)[None, :, None, None] * rel
    return bias.masked_fill(~allowed, float("-inf"))


def fused_statistics(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos, scale: float) -> torch.Tensor:
    """The layer's attention output [batch, head, q_pos, d_head] from the fused kernel, with the RowStats of every
    query handed to the layer's `row_statistics` callback (module docstring); no pattern is formed."""
    from .decoder import alibi_slopes, repeat_kv

    fn, first_k, need, rows = attn.row_statistics
    k, v = repeat_kv(k, attn.n_rep), repeat_kv(v, attn.n_rep)  # [batch, head, k_pos, d_head]
    b, h, n_q, d = q.shape
    n_k = k.shape[-2]
    extra = ([k] if "entropy" in need else [])  # the entropy also needs the key index under ALiBi: always given
    if "distance" in need or "entropy" in need:
        extra.append(torch.arange(n_k, dtype=v.dtype, device=v.device)[None, None, :, None].expand(b, h, n_k, 1))
    width = d + sum(x.shape[-1] for x in extra)
    width += -width % 8 if extra else 0  # a multiple of 8 keeps the kernel's inner loops vectorised
    values = F.pad(torch.cat([v, *extra], -1), (0, width - d - sum(x.shape[-1] for x in extra)))  # [b, h, k_pos, width]
    q_wide, k_wide = F.pad(q, (0, width - d)), F.pad(k, (0, width - d))  # zero columns: the scores do not change
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out = torch.empty_like(q)
    plain = (pos.past == 0 and pos.key_valid is None and attn.window is None and attn.positional != "alibi")
    step = n_q if plain else 4 * rows
    for start in range(0, n_q, step):
        stop = min(start + step, n_q)
        q_idx = torch.arange(pos.past + start, pos.past + stop, device=q.device)
        lo = 0 if attn.window is None else max(0, pos.past + start - attn.window + 1)
        hi = pos.past + stop  # keys after the chunk's last query are masked for every row
        k_idx = torch.arange(lo, hi, device=q.device)
        if plain:
            o, lse = kernel(q_wide, k_wide, values, 0.0, True, scale=scale)
        else:
            o, lse = kernel(q_wide[..., start:stop, :], k_wide[..., lo:hi, :], values[..., lo:hi, :], 0.0, False,
                            attn_mask=_bias(attn, q_idx, k_idx, pos.key_valid, q.dtype), scale=scale)
        out[..., start:stop, :] = o[..., :d]  # [batch, head, rows, d_head]
        q_rows = q[..., start:stop, :]
        first_idx = torch.arange(min(first_k, n_k), device=q.device)
        s_first = (q_rows @ k[..., :first_k, :].transpose(-1, -2)) * scale  # [batch, head, rows, k]
        s_first = s_first + _bias(attn, q_idx, first_idx, pos.key_valid, q.dtype)
        stats = RowStats(first_k=(s_first - lse[..., None]).exp(), entropy=None, mean_key=None)
        mean_key = o[..., d + (d if "entropy" in need else 0)] if extra else None  # [batch, head, rows]: sum_j p_j j
        if "entropy" in need:
            expected = scale * (q_rows * o[..., d:2 * d]).sum(-1)  # sum_j p_j s_j without the bias
            if attn.positional == "alibi":
                slopes = alibi_slopes(attn.n_heads, dtype=q.dtype).to(q.device)[None, :, None]
                expected = expected + slopes * (mean_key - q_idx.to(q.dtype))
            stats.entropy = lse - expected
        stats.mean_key = mean_key if "distance" in need else None
        fn(stats, pos.past + start)
    return out


def block_scores(attn, q: torch.Tensor, q_far, k: torch.Tensor, pos, scale: float, rows: slice) -> torch.Tensor:
    """Masked scores [batch, head, rows, keys] of query rows `rows` against the first `keys` keys, exactly as the
    explicit path computes them. k: [batch, head, keys, d_head] (key heads already repeated)."""
    from . import dca
    from .decoder import alibi_slopes, attention_allowed

    if q_far is not None:
        scores = dca.dca_scores(q, q_far, k, attn.dca, pos.past, scale, rows)
    else:
        scores = (q[..., rows, :] @ k.transpose(-1, -2)) * scale  # [batch, head, rows, k_pos]
    if attn.softcap is not None:
        scores = torch.tanh(scores / attn.softcap) * attn.softcap
    device = q.device
    q_idx = torch.arange(pos.past + rows.start, pos.past + rows.stop, device=device)
    k_idx = torch.arange(k.shape[-2], device=device)
    if attn.positional == "alibi":
        compute = torch.promote_types(scores.dtype, torch.float32)
        rel = (k_idx[None, :] - q_idx[:, None]).to(compute)  # [rows, k]
        slopes = alibi_slopes(attn.n_heads, dtype=compute).to(device)  # [head]
        scores = scores + (slopes[:, None, None] * rel).to(scores.dtype)[None]
    allowed = attention_allowed(q_idx, k_idx, attn.window)[None, None]  # [1, 1, rows, k]
    if pos.key_valid is not None:
        allowed = allowed & pos.key_valid[:, None, None, :k.shape[-2]]
        allowed = allowed | (q_idx[:, None] == k_idx[None, :])[None, None]  # a padding query sees itself
    return scores.masked_fill(~allowed, float("-inf"))


def chunked_explicit(attn, q: torch.Tensor, q_far, k: torch.Tensor, v: torch.Tensor, pos, scale: float) -> torch.Tensor:
    """The explicit attention path by blocks of query rows: [batch, head, q_pos, d_head]. Each block's pattern goes to
    the layer's `pattern_chunks` callback (if any) before it is multiplied by v."""
    from .decoder import attention_softmax, repeat_kv

    fn, n_rows = attn.pattern_chunks if attn.pattern_chunks is not None else (None, DEFAULT_ROWS)
    k, v = repeat_kv(k, attn.n_rep), repeat_kv(v, attn.n_rep)  # [batch, head, k_pos, d_head]
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)
    for start in range(0, q.shape[-2], n_rows):
        rows = slice(start, min(start + n_rows, q.shape[-2]))
        last = pos.past + rows.stop  # keys after the block's last query are masked for every row: left out
        scores = block_scores(attn, q, q_far, k[..., :last, :], pos, scale, rows)  # [batch, head, rows, last]
        pattern = attention_softmax(scores, attn.sinks, softmax_dtype).to(q.dtype)
        if fn is not None:
            fn(pattern, pos.past + start)
        out[..., rows, :] = pattern @ v[..., :last, :]
    return out
