"""Positional vectors, attention sinks and positional interventions (Dong et al., NeurIPS 2024, "Exploring Context Window of
LLMs via Decomposed Positional Vectors").

Residual stream layers are numbered like transformers' hidden states, without its last-entry quirk: layer 0 is the embedding
output (`blocks.0.hook_resid_pre`) and layer l >= 1 the output of block l-1 (`blocks.{l-1}.hook_resid_post`).

Mean-based decomposition over N samples of T tokens: h[l, t] = p[l, t] + c[l, t], where the positional vector p[l, t] is the
mean of h[l, t] over samples and c is the semantic residual. Sums are streamed in float64, so memory does not grow with N.

How much of the residual stream is positional, per layer (all expectations over samples and positions t < T):
    positional_share  = sum_t ||p_t||^2 / sum_t E||h_t||^2
        share of the raw second moment carried by the positional vectors (the rest, E||c||^2, is semantic);
    positional_r2     = sum_t ||p_t - m||^2 / sum_t E||h_t - m||^2,   m = mean_t p_t (the mean vector)
        variance explained by position once the constant mean vector is removed (between-position over total variance,
        eta^2 of a one-way ANOVA with position as the factor). The first is dominated by a large constant offset,
        the second is not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from residscope.model.errors import InputError, MissingFileError

Hook = tuple[str, Callable]


# ---------------------------------------------------------------------------------------------------------------------
# layer numbering
# ---------------------------------------------------------------------------------------------------------------------
def resid_hook_name(layer: int) -> str:
    """Hook of residual-stream layer `layer`: 0 = embeddings (entering block 0), l = output of block l-1."""
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


def resid_hook_names(n_layers: int) -> list[str]:
    return [resid_hook_name(layer) for layer in range(n_layers + 1)]


def _check_layer(layer: int, n_resid_layers: int) -> int:
    if not 0 <= layer < n_resid_layers:
        raise InputError(f"layer {layer} out of range: residual layers are 0 (embeddings) .. {n_resid_layers - 1}")
    return int(layer)


# ---------------------------------------------------------------------------------------------------------------------
# decomposition
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class PositionalDecomposition:
    """Streaming mean-based decomposition of the residual stream (all float64, on CPU).

    vectors: [layer, pos, d_model] positional vectors p[l, t] (layer 0 = embeddings, n_layers + 1 layers)
    second_moment: [layer, pos] E_samples ||h[l, t]||^2
    mean_token_norm: [layer, pos] E_samples ||h[l, t]|| (norm of each token, then averaged; massive activations show here)
    """

    vectors: torch.Tensor
    second_moment: torch.Tensor
    mean_token_norm: torch.Tensor
    n_samples: int
    hook_names: list[str] = field(default_factory=list)

    @property
    def n_resid_layers(self) -> int:
        return self.vectors.shape[0]

    @property
    def seq_len(self) -> int:
        return self.vectors.shape[1]

    @property
    def mean_vector(self) -> torch.Tensor:
        """[layer, d_model] mean of the positional vectors over positions."""
        return self.vectors.mean(dim=1)

    @property
    def semantic_second_moment(self) -> torch.Tensor:
        """[layer, pos] E||c[l, t]||^2 = E||h||^2 - ||p||^2 (clamped at 0 against rounding)."""
        return (self.second_moment - self.vectors.pow(2).sum(-1)).clamp(min=0)

    def variance_shares(self, skip_first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """([layer] positional_share, [layer] positional_r2) over positions t >= skip_first (see the module docstring).

        With skip_first=0 a massive first token can dominate both; skip_first=k describes the later positions alone.
        """
        if not 0 <= skip_first < self.seq_len:
            raise InputError(f"skip_first must be in 0..{self.seq_len - 1}, got {skip_first}")
        p, h2 = self.vectors[:, skip_first:], self.second_moment[:, skip_first:]  # [layer, pos', d_model], [layer, pos']
        share = p.pow(2).sum((-1, -2)) / h2.sum(-1)
        m = p.mean(dim=1, keepdim=True)  # [layer, 1, d_model]
        between = (p - m).pow(2).sum((-1, -2))
        # E||h - m||^2 = E||h||^2 - 2 p.m + ||m||^2, per position
        total = (h2 - 2 * (p * m).sum(-1) + m.pow(2).sum(-1)).sum(-1)
        return share, between / total

    @property
    def positional_share(self) -> torch.Tensor:
        """[layer] sum_t ||p_t||^2 / sum_t E||h_t||^2 (see the module docstring)."""
        return self.variance_shares()[0]

    @property
    def positional_r2(self) -> torch.Tensor:
        """[layer] sum_t ||p_t - m||^2 / sum_t E||h_t - m||^2 with m the mean vector (see the module docstring)."""
        return self.variance_shares()[1]

    def save(self, path: str | Path) -> Path:
        """Write the decomposition as safetensors (atomically: temp file, then rename)."""
        from safetensors.torch import save_file

        from residscope.common.atomic import atomic_write

        tensors = {"vectors": self.vectors.contiguous(), "second_moment": self.second_moment.contiguous(),
                   "mean_token_norm": self.mean_token_norm.contiguous()}
        metadata = {"n_samples": str(self.n_samples), "hook_names": json.dumps(self.hook_names)}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: str | Path) -> "PositionalDecomposition":
        """Read a decomposition written by `save` (e.g. to reuse positional vectors for context extension)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"{path}: no such positional-vector file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in ("vectors", "second_moment", "mean_token_norm")}
            return cls(**tensors, n_samples=int(meta["n_samples"]), hook_names=json.loads(meta.get("hook_names", "[]")))
        except (KeyError, ValueError, OSError, SafetensorError) as e:
            raise InputError(f"{path}: not a positional-vector file written by PositionalDecomposition.save ({e})") from None


class _MomentAccumulator:
    """Float64 running sums of h, ||h||^2 and ||h|| per (layer, position) for a fixed sequence length."""

    def __init__(self, n_resid_layers: int, d_model: int):
        self.n_resid_layers, self.d_model = n_resid_layers, d_model
        self.sum_h: torch.Tensor | None = None  # [layer, pos, d_model]
        self.sum_sq: torch.Tensor | None = None  # [layer, pos]
        self.sum_norm: torch.Tensor | None = None  # [layer, pos]
        self.n_samples = 0

    def allocate(self, pos: int) -> None:
        if self.sum_h is None:
            self.sum_h = torch.zeros(self.n_resid_layers, pos, self.d_model, dtype=torch.float64)
            self.sum_sq = torch.zeros(self.n_resid_layers, pos, dtype=torch.float64)
            self.sum_norm = torch.zeros(self.n_resid_layers, pos, dtype=torch.float64)

    def hook(self, layer: int) -> Callable:
        def accumulate(resid: torch.Tensor, hook) -> None:
            h = resid.detach().to("cpu", torch.float64)  # [batch, pos, d_model]
            self.allocate(h.shape[1])
            if h.shape[1] != self.sum_h.shape[1]:
                raise InputError(f"all batches must have the same sequence length: got {h.shape[1]} after {self.sum_h.shape[1]}")
            sq = h.pow(2).sum(-1)  # [batch, pos]
            self.sum_h[layer] += h.sum(0)
            self.sum_sq[layer] += sq.sum(0)
            self.sum_norm[layer] += sq.sqrt().sum(0)

        return accumulate


@torch.no_grad()
def decompose_positions(model, batches: Iterable[torch.Tensor], *, progress: bool = True,
                        group=None) -> PositionalDecomposition:
    """Mean-based positional decomposition over token-id batches [batch, pos] of one common length (no padding).

    Under torch.distributed (`group`, or the default group when initialised) each rank takes its share of the batches
    and the float64 sums are all-reduced; every rank returns the whole decomposition.
    """
    from residscope.runtime.distributed import agree, all_reduce_sum
    from residscope.runtime.runner import forward_batches

    cfg = model.cfg
    names = resid_hook_names(cfg.n_layers)
    acc = _MomentAccumulator(len(names), cfg.d_model)
    hooks = [(name, acc.hook(layer)) for layer, name in enumerate(names)]
    # everything we need is in the residual stream: skip the final norm and unembedding
    for run in forward_batches(model, batches, hooks=hooks, stop_at_layer=cfg.n_layers, group=group,
                               progress=progress, desc="positional vectors"):
        acc.n_samples += run.ids.shape[0]
    seq_len = agree(acc.sum_h.shape[1] if acc.sum_h is not None else None, group, what="sequence length")
    if seq_len is None:
        raise InputError("no batches given: the decomposition needs at least one sample")
    acc.allocate(seq_len)  # a rank without batches contributes zeros
    sum_h, sum_sq, sum_norm = (all_reduce_sum(t, group) for t in (acc.sum_h, acc.sum_sq, acc.sum_norm))
    n = int(all_reduce_sum(torch.tensor(float(acc.n_samples)), group))
    return PositionalDecomposition(vectors=sum_h / n, second_moment=sum_sq / n, mean_token_norm=sum_norm / n,
                                   n_samples=n, hook_names=names)


# ---------------------------------------------------------------------------------------------------------------------
# descriptions of the positional vectors
# ---------------------------------------------------------------------------------------------------------------------
def cosine_similarity_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """[..., pos, d] -> [..., pos, pos] cosine similarities between positions."""
    unit = torch.nn.functional.normalize(vectors, dim=-1, eps=1e-12)
    return unit @ unit.transpose(-1, -2)


def count_distinct_vectors(vectors: torch.Tensor, cos_threshold: float = 0.95) -> tuple[int, np.ndarray]:
    """Number of distinct positional vectors among [pos, d_model] and each position's cluster label.

    Rule: complete-linkage agglomerative clustering on cosine distance, cut at 1 - cos_threshold, so every pair of
    positions inside one cluster has cosine similarity >= cos_threshold. Clusters are labelled in order of first position.
    """
    from sklearn.cluster import AgglomerativeClustering

    x = vectors.detach().cpu().double().numpy()
    if len(x) == 1:
        return 1, np.zeros(1, dtype=int)
    labels = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="complete",
                                     distance_threshold=1.0 - cos_threshold).fit_predict(x)
    _, first = np.unique(labels, return_index=True)
    relabel = {labels[i]: k for k, i in enumerate(sorted(first))}
    return len(first), np.array([relabel[v] for v in labels])


@dataclass
class PositionalDescription:
    """Per-layer descriptions of the positional vectors (layer 0 = embeddings).

    vector_norms: [layer, pos] ||p[l, t]||
    similarity: [layer, pos, pos] cosine similarity between positional vectors
    pca_coords: [layer, pos, n_components] positional vectors projected on their own principal components (per layer)
    pca_explained: [layer, n_components] explained-variance ratio of those components
    n_distinct: [layer] number of distinct positional vectors (`count_distinct_vectors`), cluster_labels [layer, pos]
    first_token_ratio: [layer, first_k] E||h[l, t]|| of each of the first k tokens over the median over positions of E||h[l, t]||
    positional_share, positional_r2: [layer] (see the module docstring); positional_r2_after_first_k: the same R² over
        positions t >= first_k, so that massive first tokens do not dominate it
    """

    vector_norms: np.ndarray
    similarity: np.ndarray
    pca_coords: np.ndarray
    pca_explained: np.ndarray
    n_distinct: np.ndarray
    cluster_labels: np.ndarray
    first_token_ratio: np.ndarray
    positional_share: np.ndarray
    positional_r2: np.ndarray
    positional_r2_after_first_k: np.ndarray
    cos_threshold: float
    first_k: int


def describe_positions(dec: PositionalDecomposition, *, n_components: int = 3, cos_threshold: float = 0.95,
                       first_k: int = 4) -> PositionalDescription:
    """Norms, similarities, PCA, distinct-vector counts and first-token outliers of a decomposition, per layer."""
    from sklearn.decomposition import PCA

    vectors = dec.vectors  # [layer, pos, d_model]
    n_layers, seq_len, d_model = vectors.shape
    k = min(first_k, seq_len)
    n_comp = min(n_components, seq_len, d_model)
    coords = np.zeros((n_layers, seq_len, n_comp))
    explained = np.zeros((n_layers, n_comp))
    n_distinct = np.zeros(n_layers, dtype=int)
    labels = np.zeros((n_layers, seq_len), dtype=int)
    for layer in range(n_layers):
        x = vectors[layer].numpy()
        if seq_len > 1 and np.ptp(x, axis=0).max() > 0:
            pca = PCA(n_components=n_comp).fit(x)
            coords[layer], explained[layer] = pca.transform(x), pca.explained_variance_ratio_
        n_distinct[layer], labels[layer] = count_distinct_vectors(vectors[layer], cos_threshold)
    median_norm = dec.mean_token_norm.median(dim=1).values  # [layer]
    return PositionalDescription(
        vector_norms=vectors.norm(dim=-1).numpy(),
        similarity=cosine_similarity_matrix(vectors).numpy(),
        pca_coords=coords,
        pca_explained=explained,
        n_distinct=n_distinct,
        cluster_labels=labels,
        first_token_ratio=(dec.mean_token_norm[:, :k] / median_norm[:, None]).numpy(),
        positional_share=dec.positional_share.numpy(),
        positional_r2=dec.positional_r2.numpy(),
        positional_r2_after_first_k=dec.variance_shares(min(k, seq_len - 1))[1].numpy(),
        cos_threshold=cos_threshold,
        first_k=k,
    )


# ---------------------------------------------------------------------------------------------------------------------
# attention: sinks and decay with distance, reduced on the fly
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class AttentionStatistics:
    """Attention reduced over samples, per block and head (blocks numbered 0 .. n_layers-1).

    sink_mass: [layer, head] mean over samples and queries q >= first_k of the attention on keys j < first_k
    by_distance: [layer, head, distance] mean over samples and queries of the attention from query q to key q - distance
    """

    sink_mass: np.ndarray
    by_distance: np.ndarray
    first_k: int
    n_samples: int

    def decay_ratio(self, near: int | None = None) -> np.ndarray:
        """[layer, head] mean attention at distances 1..near over the mean at the farthest half of distances
        (sink keys included); > 1 means attention decays with distance. near defaults to seq_len // 8 (at least 1)."""
        t = self.by_distance.shape[-1]
        near = near or max(1, t // 8)
        far = self.by_distance[..., t // 2:].mean(-1)
        return self.by_distance[..., 1:near + 1].mean(-1) / np.maximum(far, 1e-30)


class _AttentionAccumulator:
    """Float64 sums per block and head, fed one block of query rows at a time (`model.attention_chunks`): attention on
    the first k keys summed over queries q >= k, and attention at each distance summed over queries. Divided by the
    number of queries that count (T - k, T - d) once the length T is known (`finish`)."""

    def __init__(self, n_layers: int, n_heads: int, first_k: int):
        self.first_k = first_k
        self.n_layers, self.n_heads = n_layers, n_heads
        self.sink: torch.Tensor | None = None  # [layer, head] float64 sums
        self.dist: torch.Tensor | None = None  # [layer, head, distance] float64 sums (grows to the longest key range)
        self.n_samples = 0

    def hook(self, layer: int) -> Callable:
        def accumulate(block: torch.Tensor, first_row: int) -> None:
            b, h, rows, keys = block.shape  # [batch, head, rows, keys]; row r is query first_row + r, keys 0..keys-1
            if self.sink is None:
                self.sink = torch.zeros(self.n_layers, h, dtype=torch.float64)
                self.dist = torch.zeros(self.n_layers, h, keys, dtype=torch.float64)
            if keys > self.dist.shape[-1]:
                self.dist = torch.nn.functional.pad(self.dist, (0, keys - self.dist.shape[-1]))
            p = block.detach().double()
            q = torch.arange(first_row, first_row + rows, device=p.device)[:, None]  # [rows, 1]
            counted = (q[:, 0] >= self.first_k).double()  # [rows]
            k = min(self.first_k, keys)
            self.sink[layer] += (p[..., :k].sum(-1) * counted).sum((0, 2)).cpu()
            d = torch.arange(keys, device=p.device)[None, :]  # [1, distance]
            by_d = p.gather(-1, (q - d).clamp(min=0).expand(b, h, rows, keys)) * (d <= q)  # [batch, head, rows, distance]
            self.dist[layer, :, :keys] += by_d.sum((0, 2)).cpu()

        return accumulate

    def finish(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sink [layer, head], by distance [layer, head, distance]) per sample, still summed over samples."""
        per_distance = seq_len - torch.arange(seq_len, dtype=torch.float64)  # queries at each distance, per sample
        return self.sink / max(seq_len - self.first_k, 1), self.dist / per_distance


@torch.no_grad()
def attention_statistics(model, batches: Iterable[torch.Tensor], *, first_k: int = 4, fwd_hooks: Sequence[Hook] = (),
                         progress: bool = True, group=None) -> AttentionStatistics:
    """Sink mass and attention against distance for every block and head, over token-id batches of one length.

    Patterns are reduced a block of query rows at a time (`model.attention_chunks.chunked_patterns`) and never held
    whole, so this runs at any length. `fwd_hooks` (e.g. `removal_hooks(...)`) run at the same time, so the statistics
    describe the intervened model. Under torch.distributed the sums are all-reduced (see `decompose_positions`).
    """
    from residscope.model.attention_chunks import chunked_patterns
    from residscope.runtime.distributed import agree, all_reduce_sum
    from residscope.runtime.runner import forward_batches

    cfg = model.cfg
    acc = _AttentionAccumulator(cfg.n_layers, cfg.n_heads, first_k)
    lengths = set()
    with chunked_patterns(model, {i: acc.hook(i) for i in model.attention_layers()}):
        for run in forward_batches(model, batches, hooks=list(fwd_hooks), stop_at_layer=cfg.n_layers, group=group,
                                   progress=progress, desc="attention"):
            acc.n_samples += run.ids.shape[0]
            lengths.add(run.ids.shape[1])
    if len(lengths) > 1:
        raise InputError(f"all batches must have the same sequence length: got {sorted(lengths)}")
    shape = agree(tuple(acc.dist.shape) if acc.dist is not None else None, group, what="attention statistics shape")
    n = int(all_reduce_sum(torch.tensor(float(acc.n_samples)), group))
    if n == 0:
        raise InputError("no batches given")
    if shape is None:  # no block has attention left: nothing to describe
        raise InputError("attention statistics: the model has no attention layers")
    if acc.dist is None:  # a rank without batches contributes zeros
        acc.sink, acc.dist = torch.zeros(shape[:2], dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    sink, dist = acc.finish(shape[-1])
    sink, dist = all_reduce_sum(sink, group), all_reduce_sum(dist, group)
    return AttentionStatistics(sink_mass=(sink / n).numpy(), by_distance=(dist / n).numpy(), first_k=first_k,
                               n_samples=n)


# ---------------------------------------------------------------------------------------------------------------------
# interventions: forward hooks on the residual stream, no weight changes
# ---------------------------------------------------------------------------------------------------------------------
# The hooks index the residual by its position in the tensor, so they assume unpadded full-sequence forwards
# (no KV cache, no left padding): use `model.generate(..., use_cache=False)` when generating with them.
class _AddDelta:
    """Hook that adds a per-position delta [pos, d_model] built (and cached) for each sequence length seen."""

    def __init__(self, make_delta: Callable[[int], torch.Tensor]):
        self.make_delta = make_delta
        self._cache: dict = {}

    def __call__(self, resid: torch.Tensor, hook) -> torch.Tensor:
        t = resid.shape[1]  # resid: [batch, pos, d_model]
        key = (t, resid.dtype, resid.device)
        if key not in self._cache:
            self._cache[key] = self.make_delta(t).to(resid.device, resid.dtype)
        return resid + self._cache[key]


def removal_hooks(dec: PositionalDecomposition, layers: int | Sequence[int], *, first_k: int | None = None) -> list[Hook]:
    """Hooks that subtract the positional vectors p[l, t] from the residual stream at each of `layers`.

    first_k=None removes them at every position (sequences may not be longer than the decomposition); first_k=k removes
    only those of the first k tokens (the "positional basis"), for sequences of any length.
    """
    layers = [layers] if isinstance(layers, int) else list(layers)
    if first_k is not None and not 1 <= first_k <= dec.seq_len:
        raise InputError(f"first_k must be in 1..{dec.seq_len}, got {first_k}")
    hooks = []
    for layer in layers:
        p = dec.vectors[_check_layer(layer, dec.n_resid_layers)]  # [pos, d_model]

        def make_delta(t: int, p=p) -> torch.Tensor:
            delta = torch.zeros(t, p.shape[1], dtype=p.dtype)
            if first_k is None:
                if t > p.shape[0]:
                    raise InputError(f"sequence of {t} tokens is longer than the decomposition ({p.shape[0]}): "
                                     f"decompose at this length or remove only the first_k positions")
                delta -= p[:t]
            else:
                k = min(first_k, t)
                delta[:k] -= p[:k]
            return delta

        hooks.append((resid_hook_name(layer), _AddDelta(make_delta)))
    return hooks


def interpolate_positions(vectors: torch.Tensor, length: int, ratio: float, keep_first: int = 4) -> torch.Tensor:
    """Positional vectors [pos, d] stretched by `ratio` to `length` positions: the first `keep_first` are kept, and position
    t >= keep_first takes the linear interpolation at keep_first + (t - keep_first) / ratio (held at the last vector past
    the end). ratio=1 returns the vectors themselves (exactly)."""
    if ratio <= 0:
        raise InputError(f"ratio must be > 0, got {ratio}")
    n = vectors.shape[0]
    t = torch.arange(length, dtype=torch.float64)
    src = torch.where(t < keep_first, t, keep_first + (t - keep_first) / ratio).clamp(max=n - 1)  # [length]
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    w = (src - lo).to(vectors.dtype)[:, None]  # [length, 1]
    return vectors[lo] * (1 - w) + vectors[hi] * w  # [length, d]


def pv_replacement_hooks(dec: PositionalDecomposition, layer: int, ratio: float, alpha: float = 1.0, keep_first: int = 4,
                         *, original: PositionalDecomposition | None = None) -> list[Hook]:
    """Positional vector replacement (Dong et al. §5): at residual layer `layer`, for positions t >= keep_first,
    h <- h - p_orig[t] + alpha * p_interp[t], where p_interp stretches `dec`'s vectors by `ratio` (`interpolate_positions`).

    Works for sequences of any length, e.g. ratio * dec.seq_len to extend a context window. `original` is the decomposition
    whose vectors are subtracted (default `dec`); measure it on sequences as long as those you run, because beyond its
    length the last original vector is subtracted (a hold, exact only where the original vectors have flattened out).
    ratio=1, alpha=1 is the identity. Use with `model.hooks(fwd_hooks=...)` or `model.run_with_hooks`.
    """
    if keep_first < 0:
        raise InputError(f"keep_first must be >= 0, got {keep_first}")
    original = original if original is not None else dec
    src = dec.vectors[_check_layer(layer, dec.n_resid_layers)]  # [pos, d_model]
    orig = original.vectors[_check_layer(layer, original.n_resid_layers)]  # [pos', d_model]
    if orig.shape[-1] != src.shape[-1]:
        raise InputError("original and dec come from models of different widths")

    def make_delta(t: int) -> torch.Tensor:
        new = interpolate_positions(src, t, ratio, keep_first)  # [t, d_model]
        held = orig[torch.arange(t).clamp(max=orig.shape[0] - 1)]  # [t, d_model]
        delta = alpha * new - held
        delta[: min(keep_first, t)] = 0
        return delta

    return [(resid_hook_name(layer), _AddDelta(make_delta))]


# ---------------------------------------------------------------------------------------------------------------------
# the removal experiment (the paper's Table 2): perplexity, sinks and decay with positional vectors removed
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class RemovalRow:
    """One setting of `removal_study`: positional vectors removed at `layers` (all positions, or the first `first_k`)."""

    layers: tuple[int, ...]
    first_k: int | None
    ppl: float
    nll: float
    sink_mass: np.ndarray  # [block] mean over heads
    decay_ratio: np.ndarray  # [block] mean over heads of AttentionStatistics.decay_ratio

    @property
    def label(self) -> str:
        if not self.layers:
            return "original"
        where = "all positions" if self.first_k is None else f"first {self.first_k}"
        return f"remove at {','.join(map(str, self.layers))} ({where})"


def removal_study(model, dec: PositionalDecomposition, batches: Sequence[torch.Tensor],
                  settings: Sequence[tuple[Sequence[int], int | None]], *, sink_k: int = 4,
                  progress: bool = True) -> list[RemovalRow]:
    """Perplexity, sink mass and attention decay of the original model and with positional vectors removed, one row per
    setting (layers, first_k) after the original. `batches` should be held-out text of at most `dec.seq_len` tokens."""
    from .perplexity import perplexity

    rows = []
    for layers, first_k in [((), None), *settings]:
        layers = tuple(int(layer) for layer in layers)
        hooks = removal_hooks(dec, layers, first_k=first_k) if layers else []
        with model.hooks(fwd_hooks=hooks):
            ppl = perplexity(model, batches, progress=progress)
        att = attention_statistics(model, batches, first_k=sink_k, fwd_hooks=hooks, progress=progress)
        rows.append(RemovalRow(layers=layers, first_k=first_k, ppl=ppl.ppl, nll=ppl.nll,
                               sink_mass=att.sink_mass.mean(-1), decay_ratio=att.decay_ratio().mean(-1)))
    return rows
