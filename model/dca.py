"""Dual Chunk Attention (An et al. 2024, "Training-Free Long-Context Scaling of Large Language Models"; ChunkLlama;
Qwen2 / Qwen2.5-1M's "DCA with YaRN"): RoPE positions remapped so that no query-key distance exceeds what the model
was trained on, as pure functions.

With chunk_len = chunk_size - local_size, the sequence is cut into chunks of chunk_len tokens (by token index):
    key j                               rotated at j % chunk_len
    query i, keys of its own chunk      rotated at i % chunk_len                                   (intra, causal)
    query i, keys of the previous chunk rotated at min(i % chunk_len + chunk_len, chunk_size)       (successive)
    query i, keys two or more back      rotated at chunk_size                                      (inter)
and one softmax runs over all keys. Within one chunk this is full attention exactly; for keys of the previous chunk
the relative distance is exact as long as i % chunk_len <= local_size, so the last local_size tokens keep true
distances across a chunk boundary.

This follows ChunkLlama's `chunkllama_attn_replace.py` and vLLM's `DualChunkRotaryEmbedding` (q_t, qc_t, k_t caches):
their inter-chunk query uses qc_t[chunk_len - 1] = min(2 chunk_len - 1, chunk_size), which is chunk_size whenever
local_size < chunk_len (every published setting); residscope uses chunk_size itself, as the issue and RESEARCH.md state.
vLLM's DCA rotation uses the unscaled base frequencies; here each layer rotates with its current RopeParams, so DCA
combines with PI / NTK / YaRN (Qwen's "DCA with YaRN").

Attention temperature (Qwen2.5-1M, vLLM's dual_chunk_flash_attn.py): with `original_max_position_embeddings` set,
queries and keys are both multiplied by s = max(1, 0.1 ln(L / original_max_position_embeddings) + 1), L the total
length (cached + new tokens) when they are computed, so logits grow by s^2; keys keep the s of the forward that made
them (vLLM multiplies keys as they enter its cache). Without it, no temperature.

The fast path computes by query chunks (one DCA chunk at a time): the intra part (causal), the successive part and the
inter part are three SDPA calls that return their log-sum-exp, merged exactly (`merge_parts`); memory is linear in
length. `dca_scores` builds the full [q_pos, k_pos] scores for the explicit path (hooked scores or patterns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import InputError
from .rope import RopeParams, apply_rope, rope_cos_sin


@dataclass(frozen=True)
class DualChunk:
    """One DCA setting. chunk_size: the longest relative position used (ChunkLlama's default: 3/4 of the trained
    window); local_size: tokens at the end of the previous chunk that keep exact distances (default 1/8 of it)."""

    chunk_size: int
    local_size: int
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        for name in ("chunk_size", "local_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"{name} must be a whole number, got {value!r}")
        if self.local_size <= 0:
            raise InputError(f"local_size must be > 0, got {self.local_size}")
        if self.chunk_size <= self.local_size:
            raise InputError(f"chunk_size must be larger than local_size ({self.local_size}), got {self.chunk_size}")
        orig = self.original_max_position_embeddings
        if orig is not None and (isinstance(orig, bool) or not isinstance(orig, int) or orig < 1):
            raise InputError(f"original_max_position_embeddings must be a whole number >= 1 or None, got {orig!r}")

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_size

    def temperature(self, length: int) -> float:
        """Qwen2.5-1M's q and k multiplier at total length `length` (1 without original_max_position_embeddings)."""
        if self.original_max_position_embeddings is None:
            return 1.0
        return max(1.0, 0.1 * math.log(length / self.original_max_position_embeddings) + 1.0)

    @classmethod
    def from_hf(cls, block: dict) -> "DualChunk":
        """From a config.json `dual_chunk_attention_config` (chunk_size, local_size, original_max_position_embeddings;
        vLLM's sparse-attention keys are an optimisation of the same result and are ignored). Raises InputError."""
        if not isinstance(block, dict):
            raise InputError(f"expected an object, got {type(block).__name__}")
        orig = block.get("original_max_position_embeddings")
        return cls(chunk_size=block.get("chunk_size"), local_size=block.get("local_size"),
                   original_max_position_embeddings=orig if orig else None)  # vLLM: 0 means "no temperature"

    def to_hf(self) -> dict:
        out = {"chunk_size": self.chunk_size, "local_size": self.local_size}
        if self.original_max_position_embeddings is not None:
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
        return out


def default_dual_chunk(window: int) -> DualChunk:
    """ChunkLlama's defaults for a model trained on `window` tokens: chunk_size 3/4 of it, local window 1/8."""
    return DualChunk(chunk_size=window * 3 // 4, local_size=max(1, window // 8))


# ---------------------------------------------------------------------------------------------------------------------
# positions
# ---------------------------------------------------------------------------------------------------------------------
def key_positions(dca: DualChunk, k_idx: torch.Tensor) -> torch.Tensor:
    """RoPE position of each key index: j % chunk_len."""
    return k_idx % dca.chunk_len


def query_positions(dca: DualChunk, q_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE positions of each query index for keys of its own chunk, of the previous chunk, and further back."""
    intra = q_idx % dca.chunk_len
    succ = (intra + dca.chunk_len).clamp(max=dca.chunk_size)
    return intra, succ, torch.full_like(q_idx, dca.chunk_size)


def key_part(dca: DualChunk, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
    """Long [q, k]: 0 where key j is in query i's chunk, 1 in the previous chunk, 2 further back; -1 after i (masked)."""
    gap = q_idx[:, None] // dca.chunk_len - k_idx[None, :] // dca.chunk_len  # [q, k]
    part = gap.clamp(max=2)
    return part.masked_fill(k_idx[None, :] > q_idx[:, None], -1)


# ---------------------------------------------------------------------------------------------------------------------
# rotation
# ---------------------------------------------------------------------------------------------------------------------
def rotate(q: torch.Tensor, k: torch.Tensor, past: int, rope: RopeParams, dca: DualChunk,
           head_dim: int) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """q [batch, pos, head, d_head], k [batch, pos, kv_head, d_head] of the tokens past..past+pos-1 ->
    (intra queries, keys, (successive queries, inter queries)), all rotated at their DCA positions."""
    b, p = q.shape[:2]
    idx = torch.arange(past, past + p, device=q.device)
    intra, succ, inter = query_positions(dca, idx)
    # dynamic NTK and LongRoPE choose from the largest position rotated; DCA never rotates past chunk_size
    seq_len = dca.chunk_size + 1 if rope.rope_type in ("dynamic", "longrope") else None

    def rotated(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_cos_sin(rope, head_dim, positions.expand(b, p), seq_len=seq_len, dtype=x.dtype)
        return apply_rope(x, cos, sin, rope.interleaved)

    return rotated(q, intra), rotated(k, key_positions(dca, idx)), (rotated(q, succ), rotated(q, inter))


def tempered(q: torch.Tensor, k: torch.Tensor, q_far: tuple[torch.Tensor, torch.Tensor], dca: DualChunk, pos):
    """Queries and keys [batch, head, pos, d_head] multiplied by the attention temperature at the current total length
    (`DualChunk.temperature`), before the keys enter a KV cache. Padded batches are refused: DCA places tokens by
    their index in the sequence."""
    if pos.key_valid is not None:
        raise InputError("attention_mask: Dual Chunk Attention places tokens by their index, so it runs unpadded "
                         "sequences only (run one sequence at a time)")
    s = dca.temperature(pos.k_len)
    if s == 1.0:
        return q, k, q_far
    return q * s, k * s, (q_far[0] * s, q_far[1] * s)


def config_dual_chunk(cfg, layer: int) -> DualChunk | None:
    """The DCA setting a checkpoint's config.json asks for (`dual_chunk_attention_config`, as Qwen2.5-1M ships it) on a
    full-attention RoPE layer; None otherwise. The block was validated when the config was read (hf_config)."""
    block = (cfg.hf_config or {}).get("dual_chunk_attention_config")
    if not block or cfg.rope_of(layer) is None or cfg.window_of(layer) is not None:
        return None
    return DualChunk.from_hf(block)


# ---------------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------------
def attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    causal_offset: int | None = None, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q k^T scale) v [batch, head, q, d_head], log-sum-exp of the scaled scores [batch, head, q]).

    causal_offset o: query t sees keys j <= t + o (None: every key). `allowed` instead: a bool mask broadcastable to
    [batch, head, q, k] (True where the query sees the key; every row needs one). On CPU this is the fused flash kernel
    behind SDPA, which returns its log-sum-exp; elsewhere an explicit computation by key blocks (same result). Also
    used by attention sinks (decoder.Attention), which rescale the output by the real keys' log-sum-exp."""
    nq, nk = q.shape[-2], k.shape[-2]
    if causal_offset is not None and causal_offset >= nk - 1:
        causal_offset = None  # every key visible to every query
    fused = q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    square = allowed is None and causal_offset == 0 and nq == nk  # plain causal: the kernel's is_causal, no mask tensor
    mask = None
    if causal_offset is not None and allowed is None and not (square and fused):
        allowed = torch.arange(nk, device=q.device)[None, :] <= torch.arange(nq, device=q.device)[:, None] + causal_offset
    if allowed is not None:
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))  # [.., q, k]
    if fused:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, square, attn_mask=mask,
                                                                          scale=scale)
    return _explicit_with_lse(q, k, v, scale, mask)


def _explicit_with_lse(q, k, v, scale, mask, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """attend_with_lse by key blocks of `block` keys, merged by their log-sum-exp (memory q x block per head)."""
    parts = []
    for s in range(0, k.shape[-2], block):
        scores = q @ k[..., s:s + block, :].transpose(-1, -2)  # [batch, head, q, block]
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
        if mask is not None:
            scores = scores + mask[..., s:s + block]
        lse = scores.logsumexp(-1)  # [batch, head, q]
        p = (scores - lse[..., None].clamp(min=torch.finfo(scores.dtype).min)).exp()
        parts.append(((p.to(v.dtype) @ v[..., s:s + block, :]), lse))
    return merge_parts(parts)


def merge_parts(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over the union of the keys of several attention calls, from their outputs [batch, head, q, d] and
    log-sum-exps [batch, head, q]: out = sum_p exp(lse_p - lse) out_p, lse = logsumexp_p lse_p."""
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse.to(torch.promote_types(lse.dtype, torch.float32)) for _, lse in parts])  # [part, b, h, q]
    total = lses.logsumexp(0)  # [batch, head, q]
    weights = (lses - total).exp().nan_to_num(0.0)  # a part with no key (lse -inf) weighs 0
    out = sum(w[..., None].to(o.dtype) * o for w, (o, _) in zip(weights, parts))
    return out, total


def chunked_attention(q: torch.Tensor, q_far: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor,
                      dca: DualChunk, past: int, scale: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """DCA output [batch, head, q_pos, d_head] by query chunks, never a [q_pos, k_pos] matrix.

    q (intra), q_far = (successive, inter): [batch, head, q_pos, d_head] for tokens past..; k, v: [batch, head, k_pos,
    d_head] with k_pos = past + q_pos (key/value heads already repeated to the query heads). sinks [head]: gpt-oss's
    learned sink logits, one more softmax column: the merged output is scaled by sigmoid(lse - sink)."""
    q_succ, q_inter = q_far
    n_q, n_k, cl = q.shape[-2], k.shape[-2], dca.chunk_len
    out = torch.empty_like(q)
    start = past
    while start < n_k:
        c = start // cl
        end = min(n_k, (c + 1) * cl)
        rows = slice(start - past, end - past)
        lo = c * cl  # first key of this chunk
        parts = [attend_with_lse(q[..., rows, :], k[..., lo:end, :], v[..., lo:end, :], scale, causal_offset=start - lo)]
        if c >= 1:
            prev = slice((c - 1) * cl, lo)
            parts.append(attend_with_lse(q_succ[..., rows, :], k[..., prev, :], v[..., prev, :], scale))
        if c >= 2:
            far = slice(0, (c - 1) * cl)
            parts.append(attend_with_lse(q_inter[..., rows, :], k[..., far, :], v[..., far, :], scale))
        merged, lse = merge_parts(parts)  # [batch, head, rows, d_head], [batch, head, rows]
        if sinks is not None:
            merged = merged * torch.sigmoid(lse - sinks.to(lse.dtype)[None, :, None])[..., None].to(merged.dtype)
        out[..., rows, :] = merged.to(out.dtype)
        start = end
    return out


def dca_scores(q: torch.Tensor, q_far: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, dca: DualChunk, past: int,
               scale: float, rows: slice | None = None) -> torch.Tensor:
    """Merged scaled scores [batch, head, q_rows, k_pos]: each key scored by the query of its part (keys after the
    query are left for the caller's causal mask), for query rows `rows` (default all) of the tokens past..; inputs as in
    `chunked_attention`."""
    rows = rows or slice(0, q.shape[-2])
    q_idx = torch.arange(past + rows.start, past + min(rows.stop, q.shape[-2]), device=q.device)
    part = key_part(dca, q_idx, torch.arange(k.shape[-2], device=q.device))  # [q, k]
    kt = k.transpose(-1, -2)
    scores = q[..., rows, :] @ kt  # [batch, head, q, k]
    for which, qp in ((1, q_far[0]), (2, q_far[1])):
        if bool((part == which).any()):
            scores = torch.where(part == which, qp[..., rows, :] @ kt, scores)
    return scores * scale
