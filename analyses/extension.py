"""Context-window extension without training: direct extrapolation, Position Interpolation, NTK-aware and dynamic NTK
scaling, YaRN, positional-vector replacement and attention-window extension (RESEARCH.md sections 3-5).

Every method is a reversible setting of a loaded model:

    with apply_method(model, "yarn", factor=4):
        logits = model(ids)            # YaRN-scaled RoPE here
    # back to the configured positions here

    none         direct extrapolation (the model as trained; ALiBi models are evaluated this way, "ALiBi as is")
    pi           Position Interpolation: every RoPE frequency divided by s (linear scaling)
    ntk          NTK-aware scaling: base' = base * s^(d / (d - 2)), d the rotary dim
    dynamic-ntk  NTK scaling recomputed from the current length L: s_eff = s * L / W - (s - 1) once L > W (transformers'
                 formula: the identity within the window at any factor, but at factor 1 still s_eff = L / W beyond it)
    yarn         YaRN: NTK-by-parts ramp (beta_fast 32, beta_slow 1) and cos/sin scaled by 0.1 ln s + 1
    dca          Dual Chunk Attention (model/dca.py) on every full-attention RoPE layer, with ChunkLlama's defaults
                 chunk_size = 3W/4, local_size = W/8 (`chunk_size=` / `local_size=` override); no attention
                 temperature; independent of s (the positions it uses never exceed chunk_size)
    pv-replace   positional-vector replacement (Dong et al.): at residual layer l, h <- h - p_orig[t] + alpha * p_interp[t]
                 with p_interp the in-window positional vectors stretched by ratio r (default s); NoPE and any other model
    window       attention-window extension (Dong et al.): window W -> s W and attention logits multiplied by lambda
                 (default ln(sW) / ln(W), which keeps the entropy of uniform attention over the window)

W, the trained window, is `max_position_embeddings` of the config unless given (`window=`). The RoPE methods need a
model whose layers use unscaled (`default`) RoPE; `window` needs sliding-window layers; `pv-replace` needs a
tokenizer (or decompositions passed in). Settings go through the decoder's positional knobs inside
`model.positional_overrides()` and hooks through `model.hooks(...)`, so leaving the `with` block restores everything.

Evaluation: `sliding_window_perplexity` (streaming, deterministic windows of the evaluation split), `passkey_accuracy`
(greedy decoding, exact match over several keys, against length and depth) and `positional_drift` (how far the positional
vectors of positions beyond the window lie from the in-window set).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from residscope.model.errors import InputError

from .passkey import passkey_keys, passkey_prompt
from .perplexity import perplexity_of

METHODS = ("none", "pi", "ntk", "dynamic-ntk", "yarn", "dca", "pv-replace", "window")
ROPE_METHODS = ("pi", "ntk", "dynamic-ntk", "yarn")


# ---------------------------------------------------------------------------------------------------------------------
# applying a method
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Extension:
    """What `apply_method` set: the method, its factor and resolved settings, and the hooks it attached."""

    method: str
    factor: float
    settings: dict = field(default_factory=dict)
    fwd_hooks: list = field(default_factory=list, repr=False)

    @property
    def cache_safe(self) -> bool:
        """False when hooks index the residual stream by position: generate with `use_cache=False` then."""
        return not self.fwd_hooks


def check_factor(factor: float | None) -> None:
    """An extension factor s: a finite number >= 1 (None: derived from the lengths)."""
    if factor is not None and not (math.isfinite(factor) and factor >= 1):
        raise InputError(f"factor must be a finite number >= 1 (an extension), got {factor}")


def check_window(window: int | None) -> None:
    if window is not None and (int(window) != window or window < 1):
        raise InputError(f"window must be a positive integer (the trained context length), got {window}")


def trained_window(model, window: int | None = None) -> int:
    """The context window the model was trained with: `window` if given, else max_position_embeddings of its config."""
    check_window(window)
    if window is not None:
        return int(window)
    w = model.cfg.max_position_embeddings
    if w is None or not w >= 1:
        raise InputError(f"the model's config has no usable max_position_embeddings ({w}): pass window= (the trained "
                         "context length)")
    return int(w)


def bos_token_id(model) -> int | None:
    """The BOS id the tokenizer puts in front of a text (None when it adds none); the decoder detects that once, when
    its tokenizer is set (`cfg.tokenizer_prepends_bos`)."""
    tok = model.tokenizer
    return tok.bos_token_id if tok is not None and model.cfg.tokenizer_prepends_bos else None


def _check_rope_layers(model, method: str) -> None:
    if model.cfg.positional != "rope":
        raise InputError(f"method {method!r} scales RoPE, but this model uses {model.cfg.positional!r} positions (use none, pv-replace or window)")
    if all(rope is None for rope in model.rope_settings()):
        raise InputError(f"method {method!r}: the model has no attention layer with RoPE left")
    for layer, rope in enumerate(model.rope_settings()):
        if rope is not None and rope.rope_type != "default":
            raise InputError(f"method {method!r}: layer {layer} already uses rope_type {rope.rope_type!r}; "
                             "extension methods start from unscaled RoPE")


def rope_setting(params, method: str, factor: float, window: int, head_dim: int):
    """The RopeParams of `method` at extension `factor` from an unscaled setting `params` (trained window `window`):
    the one place that maps a method name to RoPE parameters ("none" keeps `params`)."""
    from .rope_bound import ntk_params

    if method == "none":
        return params
    if method == "pi":
        return params.replace(rope_type="linear", factor=float(factor))
    if method == "ntk":
        return ntk_params(params, float(factor), head_dim)
    if method == "dynamic-ntk":
        return params.replace(rope_type="dynamic", factor=float(factor), max_position_embeddings=window)
    if method == "yarn":
        return params.replace(rope_type="yarn", factor=float(factor), original_max_position_embeddings=window)
    raise ValueError(f"not a RoPE method: {method!r}")


def default_pv_layer(model) -> int:
    """Residual layer for positional-vector replacement: an early one (Dong et al. used 4 of 22), at least 1."""
    return max(1, model.cfg.n_layers // 4)


def calibration_decomposition(model, length: int, *, samples: int = 64, batch_size: int = 8, seed: int = 0, progress: bool = False):
    """Positional vectors of `model` on `samples` calibration chunks of `length` tokens (BOS first when the tokenizer
    adds one): the in-window set at the trained window, the vectors to replace or measure at longer lengths."""
    from .corpus import batched, builtin_text, token_chunks, tokenize
    from .positional import decompose_positions

    if model.tokenizer is None:
        raise InputError("pv-replace needs the model's tokenizer (or pass decomposition= and original=)")
    tokens = tokenize(model.tokenizer, builtin_text("calibration"))
    available = tokens.numel() // length
    chunks = token_chunks(tokens, length, min(samples, available), seed=seed, bos_token_id=bos_token_id(model))
    return decompose_positions(model, list(batched(chunks, batch_size)), progress=progress)


def method_options(method: str, *, window: int | None = None, ratio: float | None = None, alpha: float | None = None,
                   layer: int | None = None, logit_scale: float | None = None, samples: int | None = None) -> dict:
    """The keyword arguments of `apply_method` that `method` takes, from options that may be None (= its default)."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    taken = {"none": (), "window": ("logit_scale",), "pv-replace": ("window", "ratio", "alpha", "layer", "samples")}
    given = dict(window=window, ratio=ratio, alpha=alpha, layer=layer, logit_scale=logit_scale, samples=samples)
    return {k: given[k] for k in taken.get(method, ("window",)) if given[k] is not None}


def extension_settings(model, method: str, lengths: Sequence[int], *, factor: float | None = None,
                       window: int | None = None, method_kw: dict | None = None) -> tuple[float, dict]:
    """(factor, apply_method keyword arguments) for evaluating `method` at `lengths`: the one place for the defaults.

    factor None: max(lengths) / trained window, at least 1 (one setting for all lengths, as when a model is extended once
    to a target length). pv-replace measures the vectors it replaces at max(lengths) unless `max_length` is given."""
    check_factor(factor)
    f = float(factor) if factor is not None else max(1.0, max(lengths) / trained_window(model, window))
    kw = dict(method_kw or {})
    if method == "pv-replace":
        kw.setdefault("max_length", max(lengths))
    return f, kw


@contextlib.contextmanager
def apply_method(
    model,
    method: str,
    factor: float = 1.0,
    *,
    window: int | None = None,
    logit_scale: float | None = None,
    ratio: float | None = None,
    alpha: float = 1.0,
    layer: int | None = None,
    keep_first: int = 4,
    max_length: int | None = None,
    decomposition=None,
    original=None,
    samples: int = 512,
    chunk_size: int | None = None,
    local_size: int | None = None,
    progress: bool = False,
) -> Iterator[Extension]:
    """Context manager: `model` extended by `method` at `factor` inside the block, restored on exit.

    window: trained window (RoPE methods, pv-replace) or attention window (method "window"; default: the config's
    sliding window). logit_scale: lambda of "window". ratio, alpha, layer, keep_first: positional-vector replacement
    (defaults: ratio = factor, alpha 1, `default_pv_layer`, first 4 tokens kept); its vectors come from `decomposition`
    (in-window) and `original` (measured at the lengths you run, default `max_length` = window * factor), computed from
    `samples` chunks of the calibration split when not given (fewer when the split holds fewer). Positional vectors are
    means over samples, so what the semantic part leaves in them falls only as 1/sqrt(samples), and replacement adds that
    residue to every position: with 64 samples it made NoPE zoo perplexity worse than no replacement.
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    check_factor(factor)
    check_window(window)
    if logit_scale is not None and not (math.isfinite(logit_scale) and logit_scale > 0):
        raise InputError(f"logit_scale must be a finite number > 0, got {logit_scale}")
    for name, value in (("ratio", ratio), ("alpha", alpha)):
        if value is not None and not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value}")
    ext = Extension(method=method, factor=float(factor))
    with model.positional_overrides():
        if method in ROPE_METHODS:
            ext.settings = _scale_rope(model, method, factor, trained_window(model, window))
        elif method == "dca":
            ext.settings = _dual_chunk(model, trained_window(model, window), chunk_size, local_size)
        elif method == "window":
            ext.settings = _extend_windows(model, factor, window, logit_scale)
        elif method == "pv-replace":
            ext.fwd_hooks, ext.settings = _pv_replacement(
                model, factor, trained_window(model, window), ratio=ratio, alpha=alpha, layer=layer,
                keep_first=keep_first, max_length=max_length, decomposition=decomposition, original=original,
                samples=samples, progress=progress)
        if ext.fwd_hooks:
            with model.hooks(fwd_hooks=ext.fwd_hooks):
                yield ext
        else:
            yield ext


def _scale_rope(model, method: str, factor: float, trained: int) -> dict:
    """Set every RoPE layer to `method` at `factor`; the settings of the first one, as transformers writes them."""
    _check_rope_layers(model, method)
    for layer, rope in enumerate(model.rope_settings()):
        if rope is not None:
            model.set_rope(rope_setting(rope, method, factor, trained, model.cfg.d_head), layers=layer)
    first = next(rope for rope in model.rope_settings() if rope is not None)
    return {"window": trained, **first.to_hf()}


def _dual_chunk(model, trained: int, chunk_size: int | None, local_size: int | None) -> dict:
    """Dual Chunk Attention on every full-attention RoPE layer (sliding-window layers keep their window)."""
    from residscope.model.dca import default_dual_chunk

    if model.cfg.positional != "rope":
        raise InputError(f"method 'dca' remaps RoPE positions, but this model uses {model.cfg.positional!r} positions")
    default = default_dual_chunk(trained)
    chunk = int(chunk_size) if chunk_size is not None else default.chunk_size
    local = int(local_size) if local_size is not None else max(1, chunk * default.local_size // default.chunk_size)
    layers = [i for i, (r, w) in enumerate(zip(model.rope_settings(), model.windows())) if r is not None and w is None]
    if not layers:
        raise InputError("method 'dca': the model has no full-attention RoPE layer")
    model.set_dual_chunk_attention(chunk, local, layers=layers)
    return {"window": trained, "chunk_size": chunk, "local_size": local, "layers": layers}


def _extend_windows(model, factor: float, window: int | None, logit_scale: float | None) -> dict:
    """Sliding windows W -> round(s W), attention logits times lambda (default ln(sW) / ln(W))."""
    windows = model.windows()
    layers = [i for i, w in enumerate(windows) if w is not None]
    if not layers:
        raise InputError("method 'window' extends sliding attention windows, but this model has none")
    old = window if window is not None else windows[layers[0]]
    new = int(round(old * factor))
    if logit_scale is None:
        logit_scale = math.log(new) / math.log(old) if old > 1 else 1.0
    model.set_window(new, layers=layers)
    model.set_attn_logit_scale(logit_scale, layers=layers)
    return {"window": old, "extended_window": new, "logit_scale": logit_scale, "layers": layers}


def _pv_replacement(model, factor: float, trained: int, *, ratio, alpha, layer, keep_first, max_length, decomposition,
                    original, samples, progress) -> tuple[list, dict]:
    """The hooks of positional-vector replacement and its settings (vectors decomposed here when not given)."""
    from .positional import pv_replacement_hooks

    if model.cfg.positional == "learned" and factor > 1:
        raise InputError("method 'pv-replace': this model's learned position table ends at its window "
                         f"({model.cfg.max_position_embeddings} positions), so there is nothing past it to replace")
    ratio = float(ratio) if ratio is not None else float(factor)
    layer = layer if layer is not None else default_pv_layer(model)
    if decomposition is None:
        decomposition = calibration_decomposition(model, trained, samples=samples, progress=progress)
    if original is None:
        length = max_length or int(round(trained * factor))
        # p_orig at lengths <= the window is the in-window decomposition itself (causal: position t sees only <= t)
        original = decomposition if length <= decomposition.seq_len else calibration_decomposition(
            model, length, samples=samples, progress=progress)
    hooks = pv_replacement_hooks(decomposition, layer, ratio, alpha, keep_first, original=original)
    return hooks, {"window": trained, "ratio": ratio, "alpha": alpha, "layer": layer, "keep_first": keep_first,
                   "original_length": original.seq_len, "samples": decomposition.n_samples}


# ---------------------------------------------------------------------------------------------------------------------
# sliding-window perplexity
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class LengthPerplexity:
    method: str
    length: int
    ppl: float
    nll: float
    n_tokens: int
    n_windows: int
    factor: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def evaluation_tokens(model, max_tokens: int | None = None, text: str | None = None) -> torch.Tensor:
    """Token ids [n] of the built-in evaluation split (held out from calibration and from zoo training), or of `text`:
    a file or a named built-in corpus such as `builtin:plays/evaluation` (long documents, for 16k-32k windows)."""
    from .corpus import builtin_text, corpus_text, tokenize

    if max_tokens is not None and (int(max_tokens) != max_tokens or max_tokens < 2):
        raise InputError(f"max_tokens must be an integer >= 2, or None for the whole split, got {max_tokens}")
    if model.tokenizer is None:
        raise InputError("the model has no tokenizer; pass token ids to sliding_window_perplexity instead")
    source = builtin_text("evaluation") if text is None else corpus_text(text, split="evaluation")[0]
    tokens = tokenize(model.tokenizer, source)
    return tokens[:max_tokens] if max_tokens is not None else tokens


def sliding_windows(n_tokens: int, length: int, stride: int, *, bos: bool = False) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) per window over a stream of n_tokens: each window holds `length` tokens, starts
    `stride` after the previous one, and scores only targets no earlier window scored. A window's first token is a
    target only when a BOS token precedes it (`bos`)."""
    if length < 2:
        raise InputError(f"length must be >= 2, got {length}")
    if not 1 <= stride <= length:
        raise InputError(f"stride must be in 1..length ({length}), got {stride}")
    if n_tokens < length:
        raise InputError(f"the text has {n_tokens} tokens, fewer than one window of {length}")
    out, scored_until = [], 0
    for start in range(0, n_tokens - length + 1, stride):
        end = start + length
        out.append((start, end, max(scored_until, start + (not bos))))
        scored_until = end
    return out


@torch.inference_mode()
def sliding_window_perplexity(model, tokens: torch.Tensor, length: int, *, stride: int | None = None, bos: int | None = None,
                              batch_size: int = 4, progress: bool = True, desc: str = "perplexity",
                              group=None) -> tuple[float, float, int, int]:
    """(ppl, nll, n_tokens, n_windows) of `tokens` [n] read in windows of `length` tokens (BOS + length-1 text tokens when
    `bos` is given), `stride` apart (default length // 2), each scoring only the targets no earlier window scored, so
    every token after the first window is predicted with at least length - stride tokens of context. Deterministic.
    Under torch.distributed each rank scores its share of the window batches and the float64 sums are all-reduced."""
    import torch.nn.functional as F

    from residscope.runtime.distributed import LOCAL, all_reduce_sums, is_main, shard
    from residscope.runtime.runner import forward_batches

    body = length - (bos is not None)
    stride = stride if stride is not None else max(1, body // 2)
    windows = sliding_windows(tokens.numel(), body, min(stride, body), bos=bos is not None)
    groups = shard([windows[i:i + batch_size] for i in range(0, len(windows), batch_size)], group)
    batches = []
    for g in groups:
        ids = torch.stack([tokens[s:e] for s, e, _ in g])  # [batch, body]
        if bos is not None:
            ids = torch.cat((torch.full((ids.shape[0], 1), bos, dtype=ids.dtype), ids), dim=1)  # [batch, length]
        batches.append(ids)  # running text, never padded (a separator sharing the pad id is a token: model/tokens.py)
    total, count = 0.0, 0
    offset = bos is not None
    # already sharded above (the windows of each batch are needed below): forward_batches runs them all (LOCAL)
    for run, g in zip(forward_batches(model, batches, group=LOCAL, progress=progress and is_main(group), desc=desc),
                      groups):
        logits = run.output.float()  # [batch, length, vocab]
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), run.ids[:, 1:], reduction="none")  # [batch, length-1]
        for row, (s, _, first) in enumerate(g):
            # target at stream index j sits at column (j - s) + offset - 1 of nll
            total += float(nll[row, first - s + offset - 1:].double().sum())
            count += nll.shape[1] - (first - s + offset - 1)
    total, count = all_reduce_sums([total, count], group)
    ppl, nll_mean = perplexity_of(total, int(count), desc)
    return ppl, nll_mean, int(count), len(windows)


def extension_perplexity(model, methods: Sequence[str], lengths: Sequence[int], *, factor: float | None = None,
                         window: int | None = None, max_tokens: int | None = 8192, stride: int | None = None,
                         batch_size: int = 4, progress: bool = True,
                         method_kw: dict[str, dict] | None = None, text: str | None = None) -> list[LengthPerplexity]:
    """Sliding-window perplexity of each method at each length. factor None: max(lengths) / trained window (at least 1),
    one setting for all lengths, as when a model is extended once to a target length. method_kw: extra keyword
    arguments of `apply_method` per method name."""
    check_factor(factor)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    tokens = evaluation_tokens(model, max_tokens, text)
    bos = bos_token_id(model)
    rows = []
    for method in methods:
        f, kw = extension_settings(model, method, lengths, factor=factor, window=window, method_kw=(method_kw or {}).get(method))
        with apply_method(model, method, f, **kw):
            for length in lengths:
                ppl, nll, n, nw = sliding_window_perplexity(model, tokens, length, stride=stride, bos=bos,
                                                            batch_size=batch_size, progress=progress, desc=f"{method} @ {length}")
                rows.append(LengthPerplexity(method=method, length=int(length), ppl=ppl, nll=nll, n_tokens=n, n_windows=nw, factor=f))
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# passkey retrieval (RESEARCH.md section 5)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class PasskeyRow:
    method: str
    length: int  # requested length; prompts are the longest that fit
    depth: float
    accuracy: float
    n_keys: int
    prompt_tokens: int
    answers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def passkey_accuracy(model, lengths: Sequence[int], depths: Sequence[float] = (0.0, 0.5, 1.0), *, n_keys: int = 5,
                     seed: int = 1234, method: str = "none", ext: Extension | None = None, progress: bool = True,
                     group=None) -> list[PasskeyRow]:
    """Exact-match passkey accuracy per (length, depth) over `n_keys` random 5-digit keys, greedy decoding.

    Run inside `apply_method` and pass its Extension as `ext` (so hooked methods decode without a KV cache).
    Under torch.distributed each rank decodes its share of the prompts and the answers are gathered on every rank."""
    if model.tokenizer is None:
        raise InputError("passkey retrieval needs the model's tokenizer")
    from residscope.runtime.distributed import gather_items, is_main, shard

    keys = passkey_keys(n_keys, seed)
    use_cache = ext.cache_safe if ext is not None else True
    grid = [(length, depth) for length in lengths for depth in depths]
    # every (length, depth, key) prompt is one item; under torch.distributed each rank decodes its share
    items = [(g, k) for g in range(len(grid)) for k in range(len(keys))]
    answers, prompt_tokens = {}, {}
    for g, k in tqdm(list(shard(items, group)), desc=f"passkey {method}", disable=not progress or not is_main(group),
                     leave=False):
        length, depth = grid[g]
        ids = passkey_prompt(model.tokenizer, length, depth, keys[k])[None].to(model.device)  # [1, n]
        out = model.generate(ids, max_new_tokens=len(keys[k]) + 3, use_cache=use_cache)
        text = model.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        found = re.search(r"\d+", text)
        answers[g, k] = found.group(0) if found else ""
        prompt_tokens[g] = ids.shape[1]
    answers, prompt_tokens = gather_items(answers, group), gather_items(prompt_tokens, group)
    rows = []
    for g, (length, depth) in enumerate(grid):
        got = [answers[g, k] for k in range(len(keys))]
        hits = sum(a == key for a, key in zip(got, keys))
        rows.append(PasskeyRow(method=method, length=int(length), depth=float(depth), accuracy=hits / len(keys),
                               n_keys=len(keys), prompt_tokens=int(prompt_tokens[g]), answers=got))
    return rows


def passkey_study(model, methods: Sequence[str], lengths: Sequence[int], depths: Sequence[float] = (0.0, 0.5, 1.0), *,
                  n_keys: int = 5, seed: int = 1234, factor: float | None = None, window: int | None = None,
                  method_kw: dict[str, dict] | None = None, progress: bool = True) -> list[PasskeyRow]:
    """Passkey accuracy of each method at each (length, depth), the model extended once per method as in
    `extension_perplexity` (same factor and keyword-argument defaults)."""
    if n_keys < 1:
        raise InputError(f"n_keys must be >= 1, got {n_keys}")
    rows = []
    for method in methods:
        f, kw = extension_settings(model, method, lengths, factor=factor, window=window, method_kw=(method_kw or {}).get(method))
        with apply_method(model, method, f, **kw) as ext:
            rows += passkey_accuracy(model, lengths, depths, n_keys=n_keys, seed=seed, method=method, ext=ext, progress=progress)
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# positional vectors beyond the window
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class PositionalDrift:
    """Per residual layer (0 = embeddings): mean over positions t >= W of min_{s < W} ||p[l, t] - p[l, s]||, divided by
    the RMS distance of in-window vectors to their mean (so 0 = inside the in-window set, ~1 = as far as the set is wide)."""

    method: str
    length: int
    window: int
    relative_distance: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def drift_from_decomposition(dec, window: int) -> list[float]:
    out = []
    for p in dec.vectors:  # [pos, d_model]
        inside, beyond = p[:window], p[window:]
        if beyond.numel() == 0:
            out.append(0.0)
            continue
        spread = (inside - inside.mean(0)).pow(2).sum(-1).mean().sqrt().clamp(min=1e-12)
        nearest = torch.cdist(beyond, inside).min(dim=1).values  # [pos - window]
        out.append(float(nearest.mean() / spread))
    return out


def positional_drift(model, method: str, length: int, *, factor: float | None = None, samples: int = 128,
                     ext_kw: dict | None = None, progress: bool = False) -> PositionalDrift:
    """Positional vectors at `length` under `method` (decomposed on calibration chunks) against the in-window set."""
    w = trained_window(model, (ext_kw or {}).get("window"))
    f, kw = extension_settings(model, method, [length], factor=factor, window=w, method_kw=ext_kw)
    with apply_method(model, method, f, **kw):
        dec = calibration_decomposition(model, length, samples=samples, progress=progress)
    return PositionalDrift(method=method, length=int(length), window=w, relative_distance=drift_from_decomposition(dec, w))


def applicable_methods(model) -> list[str]:
    """The methods that make sense for this model's positional scheme."""
    methods = ["none"]
    ropes = [r for r in model.rope_settings() if r is not None]
    if model.cfg.positional == "rope" and ropes and all(r.rope_type == "default" for r in ropes):
        methods += list(ROPE_METHODS)
    if model.cfg.positional == "rope" and ropes:
        methods.append("dca")
    if model.cfg.positional != "learned":  # a learned table has no positions past the window to replace vectors at
        methods.append("pv-replace")
    if any(w is not None for w in model.windows()):
        methods.append("window")
    return methods
