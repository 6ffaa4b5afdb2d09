"""RoPE base and context length (Men et al., 2024, "Base of RoPE Bounds Context Length"; RESEARCH.md section 3).

For queries/keys with i.i.d. components, the advantage of a similar key over a random one at relative distance m is
proportional to

    B(m) = sum_{i < d/2} cos(m * theta_i).

* context bound of a set of frequencies: the largest L with B(m) >= 0 for every integer m in [0, L];
* lower bound of the base for a length L: the smallest base whose default frequencies theta_i = base^(-2i/d) keep
  B(m) >= 0 for every integer m in [0, L]. B is not monotone in the base, so the search below is an exhaustive sweep
  of a log grid (no bisection over the whole range), refined only between the last failing and the first passing
  grid point; see `base_lower_bounds` for exactly what "smallest" means.

Everything is float64. B(m) is evaluated in blocks as a matrix product (cos(a + b) = cos a cos b - sin a sin b):
rows are block starts, columns small offsets, so a block of J*K values costs J + K cosine evaluations per frequency
and one [J, 2n] @ [2n, K] matmul instead of J*K*n cosines. The matmul runs in float32 as a screen; every value it cannot
vouch for (below its worst-case error bound) is recomputed directly as sum(cos(m * theta)) in float64, so every sign
decision is a float64 one. float64 itself cannot decide the sign of |B| below ~1e-8 at m ~ 2^22 (the angle m*theta
carries an absolute rounding error of ~m * 1e-16 rad); every result reports its margin so close calls are visible.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from residscope.model.errors import InputError
from residscope.model.rope import RopeParams, inv_freq as rope_inv_freq, rotary_dim

DEFAULT_MAX_M = 1 << 22  # 4M positions: the context bound search gives up (capped=True) beyond this
# Limits that keep every call to minutes on one CPU core (a lower bound at 2^20 takes ~30 s at the default grid step,
# and the sweep's cost grows as ln(base) / grid_step); beyond them the arguments are refused, not run for hours.
MAX_LENGTH = 1 << 22
MAX_M_LIMIT = 1 << 28
MIN_GRID_STEP = 1e-5
_COLS = 512  # offsets per block (columns of the matmul)
_MAX_ROWS = 1024  # block starts per block: at most 512K values (4 MiB) per block
_N_WITNESSES = 16  # most negative positions kept from each failing scan, to kill neighbouring bases cheaply

# Published lower bounds of the base, head dim 128 (Men et al., 2024, via RESEARCH.md section 3).
PUBLISHED_BASE_LOWER_BOUNDS: dict[int, float] = {
    1 << 10: 4.3e3, 1 << 11: 1.6e4, 1 << 12: 2.7e4, 1 << 13: 8.4e4, 1 << 14: 3.1e5, 1 << 15: 6.4e5,
    1 << 16: 2.1e6, 1 << 17: 7.8e6, 1 << 18: 3.6e7, 1 << 19: 6.4e7, 1 << 20: 5.1e8,
}


def _one_thread(fn):
    """Run `fn` with one intra-op thread. The tensors here are small ([1024, 128] @ [128, 512] at most), so a second
    OpenMP thread gains little, while on a busy machine OpenMP's spin-waiting makes small ops 100x slower."""

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kw)
        finally:
            torch.set_num_threads(before)

    return wrapper


# ---- arguments --------------------------------------------------------------------------------------------------
def check_head_dim(head_dim: int) -> None:
    if int(head_dim) != head_dim or head_dim < 2 or head_dim % 2:
        raise InputError(f"head_dim must be an even integer >= 2, got {head_dim}")


def check_max_m(max_m: int) -> None:
    if int(max_m) != max_m or not 1 <= max_m <= MAX_M_LIMIT:
        raise InputError(f"max_m must be an integer in 1..{MAX_M_LIMIT:,} (2^28), got {max_m}")


def check_search(lengths: list[int], grid_step: float, refine_rtol: float) -> None:
    """Arguments of the base lower bound search, refused when they are meaningless or would run for hours."""
    if not (math.isfinite(grid_step) and MIN_GRID_STEP <= grid_step <= 1):
        raise InputError(f"grid_step must be in [{MIN_GRID_STEP:g}, 1] (relative spacing of the base grid), got {grid_step}")
    if not (math.isfinite(refine_rtol) and 0 < refine_rtol <= grid_step):
        raise InputError(f"refine_rtol must be in (0, grid_step], got {refine_rtol}")
    for length in lengths:
        if int(length) != length or not 1 <= length <= MAX_LENGTH:
            raise InputError(f"length must be an integer in 1..{MAX_LENGTH:,} (2^22), got {length}")


# ---- frequencies ------------------------------------------------------------------------------------------------
def default_inv_freq(base: float, head_dim: int) -> torch.Tensor:
    """theta_i = base^(-2i/d), i < d/2, float64 [d/2]."""
    check_head_dim(head_dim)
    if not (base > 1 and math.isfinite(base)):
        raise InputError(f"base must be a finite number > 1, got {base}")
    return torch.exp(-math.log(base) * torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def rope_frequencies(params: RopeParams, head_dim: int, seq_len: int | None = None) -> torch.Tensor:
    """The frequencies a model's attention uses, from the model's own RoPE code, float64 [head_dim // 2].

    Pairs past the rotary dim (partial rotary) are not rotated: they enter B(m) with frequency 0, i.e. cos = 1 at every
    distance, exactly as a q/k pair that RoPE leaves alone contributes to q.k.
    """
    freq, _ = rope_inv_freq(params, head_dim, seq_len=seq_len, dtype=torch.float64)  # [rotary_dim // 2]
    pad = head_dim // 2 - freq.numel()
    return torch.cat((freq, torch.zeros(pad, dtype=torch.float64))) if pad > 0 else freq


def ntk_base(base: float, factor: float, rotary_dim_: int) -> float:
    """NTK-aware scaled base: base * s^(d / (d - 2)) (d = rotary dim), which stretches the lowest frequency by s."""
    if factor <= 0:
        raise InputError(f"factor must be positive, got {factor}")
    if rotary_dim_ <= 2:
        raise InputError(f"NTK scaling needs a rotary dim > 2, got {rotary_dim_}")
    return base * factor ** (rotary_dim_ / (rotary_dim_ - 2))


def ntk_params(params: RopeParams, factor: float, head_dim: int) -> RopeParams:
    """`params` with the NTK-aware base for an extension by `factor` (all other fields, incl. any scaling, kept)."""
    return params.replace(theta=ntk_base(params.theta, factor, rotary_dim(params, head_dim)))


# ---- B(m) -------------------------------------------------------------------------------------------------------
@_one_thread
def rope_sum(m: torch.Tensor | int, base: float | None = None, head_dim: int | None = None, *, inv_freq: torch.Tensor | None = None,
             chunk: int = 1 << 16) -> torch.Tensor:
    """B(m) = sum_i cos(m * theta_i), computed directly, float64, for integer positions `m` [N] (chunked)."""
    theta = _frequencies(base, head_dim, inv_freq)
    m = torch.as_tensor(m, dtype=torch.float64).reshape(-1)  # [N]
    out = torch.empty_like(m)
    for lo in range(0, m.numel(), chunk):
        out[lo:lo + chunk] = torch.cos(m[lo:lo + chunk, None] * theta).sum(-1)  # [chunk, n] -> [chunk]
    return out


def _frequencies(base, head_dim, inv_freq) -> torch.Tensor:
    if inv_freq is not None:
        if base is not None:
            raise InputError("give either base (with head_dim) or inv_freq, not both")
        theta = torch.as_tensor(inv_freq, dtype=torch.float64).reshape(-1)
        if theta.numel() == 0 or not torch.isfinite(theta).all() or (theta < 0).any():
            raise InputError("inv_freq must be a non-empty vector of finite, non-negative frequencies")
        return theta
    if base is None or head_dim is None:
        raise InputError("give base and head_dim, or inv_freq")
    return default_inv_freq(float(base), int(head_dim))


@dataclass
class _Scan:
    first_negative: int | None  # first integer m in [start, stop] with B(m) < 0
    min_value: float  # min B over the scanned positions before the first negative
    argmin: int
    witnesses: list[int] = field(default_factory=list)  # the most negative positions of the failing block


class _Blocks:
    """Screens B(m) for one frequency vector in blocks [m0, m0 + rows * _COLS) with a float32 matmul.

    float32 bounds the error of a block value by (2n)^2 * 2^-23 (2n products of terms in [-1, 1]); every value below
    that tolerance is recomputed directly in float64, so signs and the first negative are float64-exact.
    """

    def __init__(self, theta: torch.Tensor):
        self.theta = theta  # [n]
        k = torch.arange(_COLS, dtype=torch.float64)
        angles = theta[:, None] * k[None, :]  # [n, K]
        self.cols = torch.cat((torch.cos(angles), torch.sin(angles)), 0).float()  # [2n, K]
        self.tol = (2 * theta.numel()) ** 2 * 2.0 ** -23

    def screen(self, m0: int, rows: int) -> torch.Tensor:
        starts = m0 + _COLS * torch.arange(rows, dtype=torch.float64)  # [J]
        angles = starts[:, None] * self.theta[None, :]  # [J, n], float64: m0 * theta can reach ~1e6 rad
        lhs = torch.cat((torch.cos(angles), -torch.sin(angles)), 1).float()  # [J, 2n]
        return (lhs @ self.cols).reshape(-1)  # [J * K]: B(m0 + j*K + k), float32


def _scan(theta: torch.Tensor, stop: int, start: int = 0, *, early_exit: bool = True) -> _Scan:
    """Scan every integer m in [start, stop] for B(m) < 0, in growing blocks (early exit at the first negative)."""
    blocks = _Blocks(theta)
    m0, rows = start, 8
    best, best_m = math.inf, start
    first = None
    witnesses: list[int] = []
    while m0 <= stop:
        approx = blocks.screen(m0, rows)[: stop - m0 + 1]  # [N] float32
        n_vals = approx.numel()
        low = (approx < blocks.tol).nonzero().reshape(-1)  # [C] positions whose sign float32 cannot vouch for
        exact = rope_sum(m0 + low, inv_freq=theta) if low.numel() else torch.empty(0, dtype=torch.float64)  # [C]
        neg = (exact < 0).nonzero().reshape(-1)
        if first is None:
            cut = int(low[neg[0]]) if neg.numel() else n_vals  # min before the first negative
            cand = []
            head_exact, head_low = exact[low < cut], low[low < cut]  # float64 values of the screened-out positions
            if head_exact.numel():
                i = int(torch.argmin(head_exact))
                cand.append((float(head_exact[i]), int(head_low[i])))
            trusted = approx[:cut].clone()
            trusted[head_low] = math.inf  # float32 values are only trusted where they cleared the tolerance
            if cut:
                i = int(torch.argmin(trusted))
                cand.append((float(trusted[i]), i))
            for v, i in cand:
                if v < best:
                    best, best_m = v, m0 + i
        if neg.numel() and first is None:
            first = m0 + int(low[neg[0]])
            order = torch.argsort(exact[neg])[:_N_WITNESSES]
            witnesses = (m0 + low[neg[order]]).tolist()
            if early_exit:
                break
        m0 += n_vals
        rows = min(rows * 2, _MAX_ROWS)
    return _Scan(first, best, best_m, witnesses)


# ---- context bound ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ContextBound:
    """How far a set of RoPE frequencies keeps B(m) >= 0."""

    bound: int  # largest L with B(m) >= 0 for every integer m in [0, L]; = max_m when capped
    first_negative: int | None  # bound + 1 (where B first dips below 0); None when capped
    capped: bool  # B stayed >= 0 up to max_m: the true bound is at least max_m
    max_m: int
    min_value: float  # min B(m) over [0, bound]: how close to 0 the curve came (float64 noise is ~1e-8)
    n_freqs: int  # number of frequency pairs summed (d / 2)


@_one_thread
def context_bound(base: float | None = None, head_dim: int | None = None, *, inv_freq: torch.Tensor | None = None,
                  max_m: int = DEFAULT_MAX_M) -> ContextBound:
    """L_theta = the largest L with B(m) >= 0 for all integer m in [0, L], for a base and head dim (default RoPE
    frequencies) or any frequency vector `inv_freq` [n]. Scans up to `max_m`; beyond that returns capped=True."""
    check_max_m(max_m)
    theta = _frequencies(base, head_dim, inv_freq)
    scan = _scan(theta, max_m)
    if scan.first_negative is None:
        return ContextBound(max_m, None, True, max_m, scan.min_value, theta.numel())
    return ContextBound(scan.first_negative - 1, scan.first_negative, False, max_m, scan.min_value, theta.numel())


# ---- lower bound of the base ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseLowerBound:
    """The smallest RoPE base keeping B(m) >= 0 on [0, length] (see `base_lower_bounds` for the exact meaning)."""

    length: int
    head_dim: int
    value: float  # the reported lower bound: a base that passes (B >= 0 for every integer m in [0, length])
    below: float  # a base just below `value` that fails: value / below - 1 <= refine_rtol
    below_first_negative: int  # the first m <= length where B < 0 at `below`
    grid_step: float  # relative spacing r of the exhaustive log grid (1 + r)^k that was swept
    grid_value: float  # the first grid point that passes (every grid point from 1 + r up to it fails)
    refine_rtol: float  # relative precision of the refinement between the last failing and first passing grid point
    verified: bool  # value passes and below fails, re-checked by a full integer-m scan
    min_value: float  # min B(m) over [0, length] at `value` (margin of the pass; float64 noise is ~1e-8)
    reach: int  # context bound of `value` itself (how far past `length` it keeps B >= 0); capped at max_m
    reach_capped: bool


def base_lower_bound(length: int, head_dim: int = 128, *, grid_step: float = 1e-3, refine_rtol: float = 1e-6,
                     max_m: int = DEFAULT_MAX_M, progress: bool = False) -> BaseLowerBound:
    """The smallest base with B(m) >= 0 for every integer m in [0, length] (head dim `head_dim`). See `base_lower_bounds`."""
    return base_lower_bounds([length], head_dim, grid_step=grid_step, refine_rtol=refine_rtol, max_m=max_m,
                             progress=progress)[0]


@_one_thread
def base_lower_bounds(lengths: list[int], head_dim: int = 128, *, grid_step: float = 1e-3, refine_rtol: float = 1e-6,
                      max_m: int = DEFAULT_MAX_M, progress: bool = False) -> list[BaseLowerBound]:
    """Lower bounds of the base for several lengths from one sweep (results in the order of `lengths`).

    What "smallest" means: the bases (1 + r)^k, k = 1, 2, ... (r = `grid_step`) are tested in increasing order, each
    exactly (every integer m up to the length). `grid_value` is the first grid base that passes, and every grid base
    below it fails, each with a witness m where B < 0. Between the last failing grid base and `grid_value` a bisection
    keeps "lo fails, hi passes" until hi / lo - 1 <= `refine_rtol`: `value` = hi passes and `below` = lo fails. So
    `value` is the infimum of the passing bases within relative `refine_rtol`, up to one caveat that no finite search
    avoids: a passing island narrower than the grid spacing r that lies below `value` would be missed.
    A passing base is not a promise for every larger base (B is not monotone in the base): use `context_bound` to check
    a specific base. Limits: lengths up to MAX_LENGTH (2^22), grid_step >= MIN_GRID_STEP (1e-5); `progress` shows the
    grid bases tested so far (tqdm).
    """
    check_search(lengths, grid_step, refine_rtol)
    check_head_dim(head_dim)
    check_max_m(max_m)
    if not lengths:
        return []
    grid_index = _sweep(sorted({int(x) for x in lengths}), head_dim, grid_step, progress=progress)
    out = {}
    log_step = math.log1p(grid_step)
    for length, k in grid_index.items():
        out[length] = _refine(length, head_dim, k, log_step, grid_step, refine_rtol, max_m)
    return [out[int(x)] for x in lengths]


def _sweep(lengths: list[int], head_dim: int, grid_step: float, batch: int = 64, progress: bool = False) -> dict[int, int]:
    """For each length, the index k of the first grid base (1 + r)^k that passes; every earlier grid base fails.

    Cost control: a base fails as soon as one m <= length has B < 0. Most bases are killed by a "witness" (a position
    where a nearby base was negative), tested for a batch of bases at once; only survivors get a full scan.
    """
    exps = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim  # [n]
    log_step = math.log1p(grid_step)
    todo = list(lengths)  # unanswered, ascending
    found: dict[int, int] = {}
    witnesses: list[int] = []  # most recent last
    k0 = 1
    bar = tqdm(desc=f"bases tried (grid step {grid_step:g})", unit=" bases", disable=not progress, leave=False)
    while todo:
        log_base = log_step * torch.arange(k0, k0 + batch, dtype=torch.float64)  # [G]
        theta = torch.exp(-log_base[:, None] * exps[None, :])  # [G, n]
        alive = _survivors(theta, [w for w in witnesses if w <= todo[0]])  # [G] bool
        n_before = len(witnesses)
        for g in alive.nonzero().reshape(-1).tolist():
            if not todo:
                break
            recent = [w for w in witnesses[n_before:] if w <= todo[0]]
            if recent and bool((rope_sum(recent, inv_freq=theta[g]) < 0).any()):
                continue
            scan = _scan(theta[g], todo[-1])
            first = scan.first_negative if scan.first_negative is not None else todo[-1] + 1
            witnesses.extend([first] + scan.witnesses)
            while todo and first > todo[0]:
                found[todo.pop(0)] = k0 + g
        witnesses = list(dict.fromkeys(witnesses[-512:]))
        k0 += batch
        bar.update(batch)
        bar.set_postfix(base=f"{math.exp(log_step * k0):.4g}", refresh=False)
    bar.close()
    return found


def _survivors(theta: torch.Tensor, witnesses: list[int]) -> torch.Tensor:
    """Which bases (rows of theta [G, n]) have B >= 0 at every witness position; the most recent witnesses first."""
    alive = torch.ones(theta.shape[0], dtype=torch.bool)
    for part in (witnesses[-32:], witnesses[:-32][-480:]):
        idx = alive.nonzero().reshape(-1)
        if not part or idx.numel() == 0:
            continue
        m = torch.tensor(part, dtype=torch.float64)  # [W]
        vals = torch.cos(m[None, :, None] * theta[idx][:, None, :]).sum(-1)  # [g, W]
        alive[idx] = ~(vals < 0).any(1)
    return alive


def _passes(log_base: float, head_dim: int, length: int) -> _Scan:
    return _scan(torch.exp(-log_base * torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim), length)


def _refine(length: int, head_dim: int, k: int, log_step: float, grid_step: float, refine_rtol: float, max_m: int) -> BaseLowerBound:
    lo, hi = (k - 1) * log_step, k * log_step  # lo fails (or is base 1), hi passes
    lo_scan = _passes(lo, head_dim, length) if k > 1 else None
    while hi - lo > math.log1p(refine_rtol):
        mid = 0.5 * (lo + hi)
        scan = _passes(mid, head_dim, length)
        if scan.first_negative is None:
            hi = mid
        else:
            lo, lo_scan = mid, scan
    value, below = math.exp(hi), math.exp(lo)
    # Independent re-check: full scan of [0, length] at value (no early exit), and the witness of `below` directly.
    full = _scan(default_inv_freq(value, head_dim), length, early_exit=False)
    below_first = lo_scan.first_negative if lo_scan is not None else 0
    below_ok = lo_scan is not None and float(rope_sum(below_first, below, head_dim)[0]) < 0
    reach = context_bound(value, head_dim, max_m=max(max_m, length))
    return BaseLowerBound(
        length=length, head_dim=head_dim, value=value, below=below, below_first_negative=below_first,
        grid_step=grid_step, grid_value=math.exp(k * log_step), refine_rtol=refine_rtol,
        verified=full.first_negative is None and below_ok, min_value=full.min_value,
        reach=reach.bound, reach_capped=reach.capped,
    )


# ---- the paper's table ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableRow:
    length: int
    computed: BaseLowerBound
    published: float | None
    published_reach: ContextBound | None  # context bound of the published base

    @property
    def note(self) -> str:
        """One sentence on how the published value relates to ours."""
        if self.published is None:
            return ""
        ours, pub, reach = self.computed.value, self.published, self.published_reach
        rounds_to_ours = abs(float(f"{ours:.2g}") - pub) <= 1e-9 * pub
        if reach is not None and not reach.capped and reach.bound < self.length:
            why = "it is ours rounded to 2 digits, but" if rounds_to_ours else "and"
            return (f"published base {pub:.2g} fails: {why} B first dips below 0 at m={reach.first_negative:,} < "
                    f"{self.length:,} (B is not monotone in the base; {ours:.4g} passes)")
        if rounds_to_ours:
            return "agrees (published value is ours rounded to 2 significant digits)"
        if pub > ours:
            return (f"published base passes but is not the smallest: {ours:.4g} already keeps B >= 0 up to {self.length:,} "
                    "(the paper's search was coarser)")
        return f"published base {pub:.2g} is below ours; it passes only through rounding or an island narrower than the grid"


@_one_thread
def paper_table(head_dim: int = 128, lengths: list[int] | None = None, **kw) -> list[TableRow]:
    """The paper's table (lengths 2^10 .. 2^20, head dim 128) computed here, next to the published values."""
    lengths = lengths or sorted(PUBLISHED_BASE_LOWER_BOUNDS)
    bounds = base_lower_bounds(lengths, head_dim, **kw)
    rows = []
    for length, computed in zip(lengths, bounds):
        pub = PUBLISHED_BASE_LOWER_BOUNDS.get(length) if head_dim == 128 else None
        reach = context_bound(pub, head_dim, max_m=length + 1) if pub is not None else None
        rows.append(TableRow(length, computed, pub, reach))
    return rows


# ---- a model's own frequencies ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerKindBound:
    """Context bound of one attention layer kind of a model (e.g. Gemma 3 sliding vs full layers)."""

    layer_kind: str
    layers: list[int]
    head_dim: int
    rotary_dim: int
    base: float  # rope theta as configured
    rope_type: str
    factor: float | None  # scaling factor (None for default RoPE)
    seq_len: int | None  # the length dynamic NTK was evaluated at (None: no dynamic scaling)
    bound: ContextBound
    max_position_embeddings: int | None
    sliding_window: int | None  # local layers never look further than this

    @property
    def covers_max_positions(self) -> bool | None:
        """Whether B stays >= 0 over every distance the layer can see (max positions, or the window if shorter)."""
        reach = min(x for x in (self.max_position_embeddings, self.sliding_window) if x is not None) \
            if (self.max_position_embeddings or self.sliding_window) else None
        if reach is None:
            return None
        return self.bound.capped or self.bound.bound >= reach - 1


@_one_thread
def model_bounds(cfg, *, seq_len: int | None = None, max_m: int = DEFAULT_MAX_M) -> list[LayerKindBound]:
    """Per layer kind of a `DecoderConfig`: head dim, rotary dim, base, scaling and the context bound of the frequencies
    the model's RoPE code produces (dynamic NTK at `seq_len`, default: the configured max positions).

    The bound is over the rotated pairs only (partial rotary: Phi-3's partial_rotary_factor, GPT-NeoX's rotary_pct):
    the pairs RoPE leaves alone add the same amount at every distance, which says nothing about how far the rotated
    frequencies tell distances apart. NoPE layers (SmolLM3) have no RoPE and no bound: they are left out of `layers`."""
    if cfg.positional != "rope":
        raise InputError(f"model uses {cfg.positional!r} position embeddings, not RoPE: no RoPE context bound")
    if cfg.max_position_embeddings is not None and not cfg.max_position_embeddings >= 1:
        raise InputError(f"config max_position_embeddings must be >= 1, got {cfg.max_position_embeddings}: "
                         "no context to compare the bound with")
    if seq_len is not None and not seq_len >= 1:
        raise InputError(f"seq_len must be >= 1, got {seq_len}")
    check_max_m(max_m)
    out = []
    for kind in dict.fromkeys(cfg.layer_types):
        params: RopeParams = cfg.rope[kind]
        theta, _ = rope_inv_freq(params, cfg.d_head, seq_len=seq_len, dtype=torch.float64)  # [rotary_dim // 2]
        layers = [i for i, t in enumerate(cfg.layer_types) if t == kind and cfg.rope_of(i) is not None]
        if not layers:
            continue  # every layer of this kind is a NoPE layer
        window = cfg.window_of(layers[0])
        dyn_len = (max(seq_len or 0, params.max_position_embeddings) if params.rope_type == "dynamic" else None)
        out.append(LayerKindBound(
            layer_kind=kind, layers=layers, head_dim=cfg.d_head, rotary_dim=rotary_dim(params, cfg.d_head),
            base=params.theta, rope_type=params.rope_type, factor=None if params.rope_type == "default" else params.factor,
            seq_len=dyn_len, bound=context_bound(inv_freq=theta, max_m=max_m),
            max_position_embeddings=cfg.max_position_embeddings, sliding_window=window,
        ))
    return out
