"""Attention statistics and per-position loss at 16k-32k tokens in bounded memory.

A [batch, head, pos, pos] pattern is 9.7 GB per layer for SmolLM2 at 16k tokens, so nothing here holds one: every
attention layer hands its pattern to a reducer one block of query rows at a time (`model.attention_chunks
.chunked_patterns`; the layer's output is computed from the same blocks), and the logits, 3.2 GB at 16k x 49k vocab,
are made and scored a slice of positions at a time from the final residual stream.

Per block and head (all means over samples; "queries" are every query position unless said otherwise):
    sink_mass         attention on the first k keys, mean over queries q >= k
    first_k           [k]: attention on each of the first k keys, mean over queries q >= k (sums to sink_mass)
    entropy           -sum_j p_j ln p_j (nats), mean over queries
    mean_distance     sum_j p_j (q - j), the mean attended distance in tokens, mean over queries
With learned attention sinks (gpt-oss) the blocks are hook_pattern's rows over the real keys, which sum to 1 - m (m: the
learned sink's mass): entropy counts the sink as one more outcome (-m ln m added), mean_distance is over real keys
only (sum_j p_j (q - j)), sink_mass / first_k are the first real tokens' attention.
By query position (mean over heads): sink_by_position, entropy_by_position, distance_by_position [layer, pos];
loss_by_position [pos - 1]: next-token NLL of position t+1 from position t, mean over samples. Optionally the positional
vectors (means of the residual stream over samples) at chosen residual layers, streamed in float64.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from residscope.model.errors import InputError

LOSS_SLICE = 1024  # positions unembedded at a time


@dataclass
class LongContextStatistics:
    """See the module docstring. Arrays: [layer, head] unless named otherwise; layers are block indices."""

    seq_len: int
    n_samples: int
    first_k: int
    layers: list[int]
    sink_mass: np.ndarray
    first_k_mass: np.ndarray  # [layer, head, k]
    entropy: np.ndarray | None  # None when not among the statistics asked for (also the *_by_position below)
    mean_distance: np.ndarray | None
    sink_by_position: np.ndarray  # [layer, pos]
    entropy_by_position: np.ndarray | None  # [layer, pos]
    distance_by_position: np.ndarray | None  # [layer, pos]
    loss_by_position: np.ndarray  # [pos - 1]
    source: str | None = None
    positional: object | None = field(default=None, repr=False)  # PositionalDecomposition of the chosen layers

    @property
    def loss(self) -> float:
        return float(self.loss_by_position.mean())

    def summary(self) -> dict:
        """Small JSON-ready summary: per-layer means over heads, and loss by position in 16 bins."""
        bins = np.array_split(self.loss_by_position, min(16, len(self.loss_by_position)))
        return dict(seq_len=self.seq_len, n_samples=self.n_samples, first_k=self.first_k, layers=self.layers,
                    source=self.source, loss=self.loss,
                    sink_mass_by_layer=self.sink_mass.mean(-1).tolist(),
                    entropy_by_layer=None if self.entropy is None else self.entropy.mean(-1).tolist(),
                    mean_distance_by_layer=None if self.mean_distance is None else self.mean_distance.mean(-1).tolist(),
                    loss_by_position_bins=[float(b.mean()) for b in bins])

    def to_dict(self) -> dict:
        out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items() if k != "positional"}
        return out


class _BlockReducer:
    """Float64 sums of one layer's per-query statistics (attention_chunks.RowStats) over a forward."""

    def __init__(self, n_heads: int, seq_len: int, first_k: int, device):
        self.k, self.t = first_k, seq_len
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.first_k, self.entropy, self.distance = z(n_heads, first_k), z(n_heads), z(n_heads)
        self.sink_pos, self.entropy_pos, self.distance_pos = z(seq_len), z(seq_len), z(seq_len)

    def __call__(self, stats, first_row: int) -> None:
        sinks = stats.first_k.double()  # [batch, head, rows, k]
        rows = sinks.shape[-2]
        q_idx = torch.arange(first_row, first_row + rows, device=sinks.device)
        counted = (q_idx >= self.k).double()  # [rows]: queries past the first k
        r = slice(first_row, first_row + rows)
        self.first_k[:, :sinks.shape[-1]] += (sinks * counted[:, None]).sum((0, 2))
        self.sink_pos[r] += sinks.sum(-1).mean(1).sum(0)
        if stats.entropy is not None:
            entropy = stats.entropy.double()  # [batch, head, rows]
            self.entropy += entropy.sum((0, 2))
            self.entropy_pos[r] += entropy.mean(1).sum(0)
        if stats.mean_key is not None:
            mass = 1.0 if stats.mass is None else stats.mass.double()  # attention on real keys (learned sinks: < 1)
            distance = q_idx.double() * mass - stats.mean_key.double()  # [batch, head, rows]: sum_j p_j (q - j)
            self.distance += distance.sum((0, 2))
            self.distance_pos[r] += distance.mean(1).sum(0)


def _loss_by_position(model, resid: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL [batch, pos - 1] from the final residual stream [batch, pos, d_model], LOSS_SLICE positions of
    logits at a time (log-softmax in float32 at least)."""
    out = []
    for s in range(0, ids.shape[1] - 1, LOSS_SLICE):
        e = min(s + LOSS_SLICE, ids.shape[1] - 1)
        logits = model.unembed_residual(model.ln_final(resid[:, s:e]))  # [batch, slice, vocab]
        log_probs = logits.log_softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        out.append(-log_probs.gather(-1, ids[:, s + 1:e + 1, None].to(logits.device))[..., 0])
    return torch.cat(out, dim=1)


@torch.inference_mode()
def long_context_statistics(model, batches: Iterable[torch.Tensor], *, first_k: int = 4, rows: int = 256,
                            statistics: Sequence[str] = ("sinks", "distance", "entropy"),
                            positional_layers: Sequence[int] = (), source: str | None = None,
                            progress: bool = True) -> LongContextStatistics:
    """Attention statistics of every attention layer and per-position loss over token-id batches [batch, pos] of one
    length, in one forward per batch, never holding a pattern larger than one block of `rows` query rows and at most
    LOSS_SLICE positions of logits. `statistics`: sinks (always), "distance", "entropy"; on CPU they come from the
    fused attention kernel where the layer allows (model/attention_chunks.py: sinks alone cost what SDPA costs), from
    pattern blocks otherwise. `positional_layers`: residual layers (0 = embeddings) whose positional vectors are also
    accumulated (float64 [layers, pos, d_model], the only part that grows with length times width)."""
    from tqdm.auto import tqdm

    from residscope.model.attention_chunks import STATISTICS, chunked_statistics

    from .positional import PositionalDecomposition, _MomentAccumulator, resid_hook_name

    if isinstance(first_k, bool) or not isinstance(first_k, int) or first_k < 1:
        raise InputError(f"first_k must be a whole number >= 1, got {first_k!r}")
    if isinstance(statistics, str) or any(x not in STATISTICS for x in statistics):
        raise InputError(f"statistics: expected a list from {', '.join(STATISTICS)}, got {statistics!r}")
    need = tuple(statistics)
    layers = model.attention_layers()
    if not layers:
        raise InputError("attention statistics: the model has no attention layers")
    n_resid = model.cfg.n_layers + 1
    pv_layers = [int(x) for x in positional_layers]
    for x in pv_layers:
        if not 0 <= x < n_resid:
            raise InputError(f"positional_layers: {x} out of range 0..{n_resid - 1}")
    sums, loss_sum, n, seq_len = None, None, 0, None
    pv = _MomentAccumulator(len(pv_layers), model.cfg.d_model) if pv_layers else None
    pv_hooks = [(resid_hook_name(x), pv.hook(i)) for i, x in enumerate(pv_layers)] if pv else []
    for ids in tqdm(list(batches), desc="long-context statistics", disable=not progress, leave=False):
        ids = ids.to(model.device)
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise InputError(f"batches must be token ids [batch, pos] with pos >= 2, got shape {tuple(ids.shape)}")
        if seq_len is None:
            seq_len = ids.shape[1]
            if first_k >= seq_len:
                raise InputError(f"first_k must be smaller than the sequence length ({seq_len}), got {first_k}")
            sums = {i: _BlockReducer(model.blocks[i].attn.n_heads, seq_len, first_k, "cpu") for i in layers}
            loss_sum = torch.zeros(seq_len - 1, dtype=torch.float64)
        elif ids.shape[1] != seq_len:
            raise InputError(f"all batches must have the same sequence length: got {ids.shape[1]} after {seq_len}")
        reducers = {i: _OnDevice(sums[i], ids.device) for i in layers}
        with chunked_statistics(model, reducers, first_k, need, rows=rows), model.hooks(fwd_hooks=pv_hooks):
            resid = model(ids, stop_at_layer=model.cfg.n_layers)  # [batch, pos, d_model]: the final residual stream
        for r in reducers.values():
            r.flush()
        loss_sum += _loss_by_position(model, resid, ids).double().sum(0).cpu()
        n += ids.shape[0]
        if pv is not None:
            pv.n_samples += ids.shape[0]
    if n == 0:
        raise InputError("no batches given")
    counted = seq_len - first_k  # queries past the first k, per sample
    stack = lambda f: torch.stack([f(sums[i]) for i in layers]).numpy()  # noqa: E731
    first = stack(lambda s: s.first_k) / (n * counted)
    positional = None
    if pv is not None:
        positional = PositionalDecomposition(vectors=pv.sum_h / n, second_moment=pv.sum_sq / n,
                                             mean_token_norm=pv.sum_norm / n, n_samples=n,
                                             hook_names=[resid_hook_name(x) for x in pv_layers])
    return LongContextStatistics(
        seq_len=seq_len, n_samples=n, first_k=first_k, layers=layers, sink_mass=first.sum(-1), first_k_mass=first,
        entropy=stack(lambda s: s.entropy) / (n * seq_len) if "entropy" in need else None,
        mean_distance=stack(lambda s: s.distance) / (n * seq_len) if "distance" in need else None,
        sink_by_position=stack(lambda s: s.sink_pos) / n,
        entropy_by_position=stack(lambda s: s.entropy_pos) / n if "entropy" in need else None,
        distance_by_position=stack(lambda s: s.distance_pos) / n if "distance" in need else None,
        loss_by_position=(loss_sum / n).numpy(),
        source=source, positional=positional)


class _OnDevice:
    """A reducer whose sums live on the model's device during a forward and are added to the CPU ones after it (so a
    GPU run does not synchronise per block)."""

    def __init__(self, target: _BlockReducer, device):
        self.target = target
        self.local = _BlockReducer(target.first_k.shape[0], target.t, target.k, device)

    def __call__(self, stats, first_row: int) -> None:
        self.local(stats, first_row)

    def flush(self) -> None:
        for name in ("first_k", "entropy", "distance", "sink_pos", "entropy_pos", "distance_pos"):
            getattr(self.target, name).add_(getattr(self.local, name).cpu())


def long_context_batches(model, seq_len: int, samples: int = 1, *, text: str = "builtin:plays/evaluation",
                         seed: int = 0) -> tuple[list[torch.Tensor], str]:
    """`samples` chunks [1, seq_len] of a long-document text (default the plays' evaluation split), BOS first when the
    tokenizer adds one, one per batch, drawn in a seeded order from the first 64 x seq_len x samples characters (the
    whole text when those hold fewer than 4 x seq_len x samples tokens); and a description of the source."""
    from .corpus import corpus_text, token_chunks, tokenize
    from .extension import bos_token_id

    if model.tokenizer is None:
        raise InputError("the model has no tokenizer; pass token-id batches to long_context_statistics")
    body, source = corpus_text(text, split="evaluation")
    # tokenise a prefix with room for 4x the chunks needed (tokenising all 1.5 MB of plays is slow for a short run),
    # the whole text when that is not enough; the chunks are then drawn in a seeded order from what was tokenised
    n_chars = 4 * 16 * seq_len * samples
    tokens = tokenize(model.tokenizer, body[:n_chars])
    if tokens.numel() < 4 * seq_len * samples and n_chars < len(body):
        tokens = tokenize(model.tokenizer, body)
    chunks = token_chunks(tokens, seq_len, samples, seed=seed, bos_token_id=bos_token_id(model))
    return list(chunks.split(1)), f"{source} ({samples}x{seq_len} tokens, seed {seed})"
