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
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from .errors import InputError

PATTERN_LIMIT = 8192  # positions: hook_pattern / hook_attn_scores are refused when q_pos x k_pos > PATTERN_LIMIT^2
DEFAULT_ROWS = 256  # query rows per block

PatternFn = Callable[[torch.Tensor, int], None]


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
