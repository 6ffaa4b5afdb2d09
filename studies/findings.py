"""The measurements behind docs/findings.md: the three papers' claims tested on real models, one question per command.

    python -m residscope.studies.findings rope-table  --out docs/findings --force   # Q5: base lower bounds vs the paper
    python -m residscope.studies.findings shortgpt    --out docs/findings --force   # Q4: layer removal by each metric
    python -m residscope.studies.findings positional  --out docs/findings --force   # Q2 + Q3: positional vectors and sinks by
                                                                                         # layer kind, then removed (one decomposition)
    python -m residscope.studies.findings rope-retrieval --out docs/findings --force   # Q1: RoPE bound vs passkey and perplexity

`--force` replaces the question's earlier results in --out (without it they are refused; `--resume` extends them).
Each command writes `<question>.json` (every number the write-up quotes, with the corpus split and the git commit it was
measured on) and one figure, `<question>.png` when plotly can write images (kaleido installed), else `<question>.html`.
Everything is computed by library functions (analyses/, surgery/); this module only chooses the settings, collects the
results and draws them. Sizes are options, so the tests run every command on the zoo models in seconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from residscope.common.atomic import atomic_write, atomic_write_text
from residscope.model.errors import InputError

QUESTIONS = ("rope-table", "shortgpt", "positional", "rope-retrieval")
RESULT_NAMES = {"rope-table": ("rope-table",), "shortgpt": ("shortgpt",), "positional": ("positional", "pv-removal"),
                "rope-retrieval": ("rope-retrieval",)}  # <name>.json and its figure, per question


# ---------------------------------------------------------------------------------------------------------------------
# output: JSON results and figures
# ---------------------------------------------------------------------------------------------------------------------
@functools.cache
def git_commit() -> str | None:
    """Commit of the code (and so of the corpus split) the numbers were measured with, when run from a git checkout.
    Read once, at the first call (the start of a run), so a checkout that moves during a long run does not relabel it."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_json(out: Path, name: str, payload: dict) -> Path:
    text = json.dumps({**payload, "commit": git_commit()}, indent=1, allow_nan=False)
    return atomic_write_text(out / f"{name}.json", text + "\n")


def can_write_png() -> bool:
    try:
        import kaleido  # noqa: F401  (plotly's static-image engine)
    except ImportError:
        return False
    return True


def write_figure(fig, out: Path, name: str, *, png: bool | None = None) -> Path:
    """`name`.png (small: 900x500, scale 1) when kaleido is installed, else a self-contained-but-small `name`.html that
    loads plotly.js from its CDN when opened."""
    png = can_write_png() if png is None else png
    if png:
        return atomic_write(out / f"{name}.png", lambda tmp: fig.write_image(str(tmp), format="png", width=900, height=500, scale=1))
    return atomic_write(out / f"{name}.html", lambda tmp: fig.write_html(str(tmp), include_plotlyjs="cdn", full_html=True))


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def _load(name: str):
    from residscope.model import load_model

    return load_model(name)


# ---------------------------------------------------------------------------------------------------------------------
# Q5: the RoPE table
# ---------------------------------------------------------------------------------------------------------------------
def min_rope_sum(base: float, head_dim: int, length: int) -> tuple[float, int]:
    """(min of B(m) over every integer m in [0, length], the m where it occurs), float64, computed directly."""
    from residscope.analyses.rope_bound import rope_sum

    b = rope_sum(torch.arange(length + 1), base, head_dim)  # [length + 1]
    i = int(torch.argmin(b))
    return float(b[i]), i


def rope_table(head_dim: int = 128, lengths: Sequence[int] | None = None, *, grid_step: float = 1e-3) -> dict:
    """Our verified lower bound of the base for each length next to the paper's published value, each checked against
    the criterion itself: min B(m) over [0, L] and where it occurs (a published value fails when that min is < 0)."""
    from residscope.analyses.rope_bound import paper_table

    rows = []
    for r in paper_table(head_dim, list(lengths) if lengths else None, grid_step=grid_step):
        ours_min, ours_at = min_rope_sum(r.computed.value, head_dim, r.length)
        row = {"length": r.length, "ours": r.computed.value, "ours_verified": r.computed.verified,
               "ours_min_b": ours_min, "ours_min_at": ours_at, "just_below_ours": r.computed.below,
               "just_below_fails_at": r.computed.below_first_negative, "published": r.published, "note": r.note}
        if r.published is not None:
            pub_min, pub_at = min_rope_sum(r.published, head_dim, r.length)
            row.update(published_min_b=pub_min, published_min_at=pub_at, published_holds=pub_min >= 0,
                       published_first_negative=r.published_reach.first_negative if r.published_reach else None)
        rows.append(row)
    return {"head_dim": head_dim, "grid_step": grid_step, "rows": rows}


def rope_table_figure(res: dict):
    from plotly.subplots import make_subplots

    rows = res["rows"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("lower bound of the base", "min B(m) over [0, L] at that base"))
    x = [r["length"] for r in rows]
    fig.add_scatter(x=x, y=[r["ours"] for r in rows], mode="lines+markers", name="ours (verified)", line_color="#1f77b4",
                    row=1, col=1)
    fig.add_scatter(x=x, y=[r["ours_min_b"] for r in rows], mode="lines+markers", name="ours", line_color="#1f77b4",
                    showlegend=False, row=1, col=2)
    pub = [r for r in rows if r["published"] is not None]
    for holds, color, symbol, label in ((True, "#2ca02c", "circle-open", "published, holds"),
                                         (False, "#d62728", "x", "published, FAILS the criterion")):
        sel = [r for r in pub if r["published_holds"] == holds]
        if not sel:
            continue
        fig.add_scatter(x=[r["length"] for r in sel], y=[r["published"] for r in sel], mode="markers", name=label,
                        marker=dict(color=color, symbol=symbol, size=11), row=1, col=1)
        fig.add_scatter(x=[r["length"] for r in sel], y=[r["published_min_b"] for r in sel], mode="markers",
                        marker=dict(color=color, symbol=symbol, size=11), showlegend=False,
                        text=[f"min at m={r['published_min_at']:,}" for r in sel], row=1, col=2)
    fig.add_hline(y=0, line_dash="dot", row=1, col=2)
    fig.update_xaxes(type="log", title_text="context length L", dtick=math.log10(2) * 2, tickformat=".2s")
    fig.update_yaxes(type="log", title_text="base", row=1, col=1)
    fig.update_yaxes(title_text="min B(m)", row=1, col=2)
    fig.update_layout(title=f"RoPE base lower bounds (head dim {res['head_dim']}): B(m) = sum cos(m theta_i) >= 0 on [0, L]",
                      legend=dict(orientation="h", y=-0.22), margin=dict(t=70, b=100))
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------------------------------
def text_batches(model, split: str, *, seq_len: int, samples: int, batch_size: int = 4, seed: int = 0) -> tuple[list[torch.Tensor], str]:
    """Seeded chunks [batch, seq_len] of the built-in corpus split, each led by BOS when the tokenizer adds one (Gemma
    does; SmolLM2 does not), and a description of the source."""
    from residscope.analyses.corpus import batched, builtin_text, token_chunks, tokenize
    from residscope.analyses.extension import bos_token_id

    bos = bos_token_id(model)
    chunks = token_chunks(tokenize(model.tokenizer, builtin_text(split)), seq_len, samples, seed=seed, bos_token_id=bos)
    source = f"builtin:pydoc_data.topics/{split} ({samples}x{seq_len} tokens, seed {seed}, {'BOS + text' if bos is not None else 'text only'})"
    return list(batched(chunks, batch_size)), source


# ---------------------------------------------------------------------------------------------------------------------
# Q4: ShortGPT on two models
# ---------------------------------------------------------------------------------------------------------------------
SHORTGPT_VERSION = 2  # results of an older version are recomputed by --resume


def shortgpt(model, *, fraction: float = 0.25, seq_len: int = 256, samples: int = 16, eval_samples: int = 8,
             seeds: int = 3, batch_size: int = 4, progress: bool = False) -> dict:
    """Held-out perplexity after removing floor(fraction * n_layers) layers chosen by each metric and baseline (random:
    mean of `seeds` seeds), and the last-layer experiment (its attention, its MLP, the whole layer)."""
    from residscope.surgery import block_influence_result, remove_layers, removal_order
    from residscope.surgery.removal import remove_sublayers

    from residscope.analyses.perplexity import perplexity

    n_layers = model.cfg.n_layers
    n = max(1, int(fraction * n_layers))
    calib, calib_source = text_batches(model, "calibration", seq_len=seq_len, samples=samples, batch_size=batch_size)
    held, held_source = text_batches(model, "evaluation", seq_len=seq_len, samples=eval_samples, batch_size=batch_size)

    def ppl(m) -> float:
        return perplexity(m, held, progress=progress).ppl

    t = Timer()
    dense = ppl(model)
    influence = block_influence_result(model, calib, "bi", progress=progress, source=calib_source)
    scores = {"bi": influence.scores, "angular": influence.angular, "relative-magnitude": influence.relative_magnitude}
    orders = {name: removal_order(v, n_layers) for name, v in scores.items()}  # every layer, least influential first
    rows = []
    for name in ("bi", "angular", "relative-magnitude"):
        removed = orders[name][:n]
        rows.append({"method": name, "removed": removed, "ppl": ppl(remove_layers(model, removed))})
    for name in ("sequential", "reverse"):
        removed = removal_order(name, n, n_layers=n_layers)
        rows.append({"method": name, "removed": removed, "ppl": ppl(remove_layers(model, removed))})
    randoms = [removal_order("random", n, n_layers=n_layers, seed=s) for s in range(seeds)]
    random_ppls = [ppl(remove_layers(model, r)) for r in randoms]
    rows.append({"method": f"random (mean of {seeds})", "removed": randoms, "ppl": statistics.fmean(random_ppls),
                 "ppls": random_ppls})

    last = n_layers - 1
    last_layer = {"dense": dense,
                  "attention": ppl(remove_sublayers(model, attn=[last])),
                  "mlp": ppl(remove_sublayers(model, mlp=[last])),
                  "whole layer": ppl(remove_layers(model, [last]))}

    # where the angular metric's order differs from BI's: every removal count up to n at which the removed sets differ,
    # with the perplexity after each (the set at n is already in the rows)
    by_name = {r["method"]: r for r in rows}
    differ = [k for k in range(1, n_layers) if set(orders["bi"][:k]) != set(orders["angular"][:k])]
    by_count = []
    for k in (k for k in differ if k <= n):
        at_n = k == n
        by_count.append({"removed_count": k, "bi_removed": orders["bi"][:k], "angular_removed": orders["angular"][:k],
                         "bi_ppl": by_name["bi"]["ppl"] if at_n else ppl(remove_layers(model, orders["bi"][:k])),
                         "angular_ppl": by_name["angular"]["ppl"] if at_n else ppl(remove_layers(model, orders["angular"][:k]))})
    differ_at = differ[0] if differ else None
    return {"n_layers": n_layers, "removed_count": n, "fraction": fraction, "dense_ppl": dense,
            "calibration": calib_source, "calibration_tokens": influence.n_tokens, "evaluation": held_source,
            "scores": {k: v.tolist() for k, v in scores.items()}, "orders": orders, "rows": rows, "last_layer": last_layer,
            "angular_vs_bi": {"first_count_where_sets_differ": differ_at,
                              "same_set_at_removed_count": set(orders["bi"][:n]) == set(orders["angular"][:n]),
                              "winner_at_removed_count": None if set(orders["bi"][:n]) == set(orders["angular"][:n])
                              else min(("bi", "angular"), key=lambda k: by_name[k]["ppl"]),
                              "by_count": by_count},
            "version": SHORTGPT_VERSION, "seconds": t.seconds()}


def shortgpt_figure(results: dict):
    from plotly.subplots import make_subplots

    names = list(results)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("perplexity / dense after removing 25% of layers",
                                                        "perplexity / dense: last layer removed"))
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c"]
    for i, name in enumerate(names):
        r = results[name]
        dense = r["dense_ppl"]
        label = f"{name} ({r['removed_count']}/{r['n_layers']} layers; dense {dense:.1f})"
        fig.add_bar(x=[row["method"].split(" (")[0] for row in r["rows"]], y=[row["ppl"] / dense for row in r["rows"]],
                    name=label, marker_color=colors[i % 3], legendgroup=name, row=1, col=1)
        parts = [k for k in r["last_layer"] if k != "dense"]
        fig.add_bar(x=parts, y=[r["last_layer"][k] / dense for k in parts], name=label, marker_color=colors[i % 3],
                    legendgroup=name, showlegend=False, row=1, col=2)
    fig.update_yaxes(type="log", title_text="x dense perplexity (log)", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title="ShortGPT layer removal, held-out perplexity", barmode="group",
                      legend=dict(orientation="h", y=-0.2), margin=dict(t=70, b=90))
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# Q2 and Q3: positional vectors and sinks by layer kind; removing positional vectors (one decomposition serves both)
# ---------------------------------------------------------------------------------------------------------------------
def resid_kinds(cfg) -> list[str]:
    """Layer kind of each residual-stream layer: "embedding" for layer 0, else the kind of the block that wrote it."""
    return ["embedding", *cfg.layer_types]


def anchors(labels, first_k: int) -> int:
    """How many of the first `first_k` positions have a positional vector of their own: a cluster (cos >= threshold)
    that no later position joins."""
    later = set(labels[first_k:].tolist())
    return sum(int(labels[t]) not in later for t in range(min(first_k, len(labels))))


def by_kind(values: Sequence[float], kinds: Sequence[str]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for v, k in zip(values, kinds):
        out.setdefault(k, []).append(float(v))
    return {k: statistics.fmean(v) for k, v in out.items()}


def positional_study(model, *, seq_len: int = 256, samples: int = 16, attn_samples: int = 8, probe_tokens: int = 2048,
                     eval_samples: int = 4, removal_layers: Sequence[int] | None = None, first_k: int = 4,
                     batch_size: int = 4, progress: bool = False) -> tuple[dict, dict]:
    """(Q2, Q3) for one model: per residual layer the first-token norm over the median token, distinct positional
    vectors and anchors among the first `first_k`, the log-position probe, and per block the sink mass, all also averaged
    by layer kind; then held-out perplexity and sink mass with the positional vectors removed at `removal_layers`
    (default: 1 and n_layers // 4), at all positions and at the first `first_k` only."""
    from residscope.probes.linear import collect_activations, position_probe

    from residscope.analyses.positional import attention_statistics, decompose_positions, describe_positions, removal_study

    cfg = model.cfg
    t = Timer()
    calib, calib_source = text_batches(model, "calibration", seq_len=seq_len, samples=samples, batch_size=batch_size)
    dec = decompose_positions(model, calib, progress=progress)
    desc = describe_positions(dec, first_k=first_k)
    few = calib[: max(1, attn_samples // batch_size)]
    att = attention_statistics(model, few, first_k=first_k, progress=progress)
    probe = position_probe(collect_activations(model, few, max_tokens=probe_tokens, progress=progress), progress=progress)
    kinds = resid_kinds(cfg)
    first_ratio = desc.first_token_ratio[:, 0].tolist()  # [resid layer]
    n_anchor = [anchors(desc.cluster_labels[layer], first_k) for layer in range(dec.n_resid_layers)]
    sink = att.sink_mass.mean(-1).tolist()  # [block]
    q2 = {"n_layers": cfg.n_layers, "layer_types": list(cfg.layer_types), "sliding_window": cfg.sliding_window,
          "rope_bases": {k: p.theta for k, p in cfg.rope.items()} if cfg.positional == "rope" else None,
          "calibration": calib_source, "seq_len": seq_len, "first_k": first_k, "cos_threshold": desc.cos_threshold,
          "layers": "residual layer 0 = embeddings, l = output of block l-1 (its kind is that block's)",
          "first_token_ratio": first_ratio, "n_distinct": desc.n_distinct.tolist(), "anchors": n_anchor,
          "positional_r2": desc.positional_r2.tolist(), "log_position_probe_r2": probe.score.tolist(),
          "log_position_probe_control": probe.control.tolist(), "sink_mass_by_block": sink,
          "attention_samples": att.n_samples, "probe_tokens": probe.n_train + probe.n_test,
          "by_kind": {"first_token_ratio": by_kind(first_ratio[1:], kinds[1:]), "n_distinct": by_kind(desc.n_distinct[1:], kinds[1:]),
                      "anchors": by_kind(n_anchor[1:], kinds[1:]), "log_position_probe_r2": by_kind(probe.score[1:], kinds[1:]),
                      "sink_mass": by_kind(sink, cfg.layer_types)},
          "seconds": t.seconds()}

    t = Timer()
    layers = list(removal_layers) if removal_layers is not None else sorted({1, max(1, cfg.n_layers // 4)})
    held, held_source = text_batches(model, "evaluation", seq_len=seq_len, samples=eval_samples, batch_size=batch_size)
    settings = [([layer], None) for layer in layers] + [([layer], first_k) for layer in layers]
    rows = removal_study(model, dec, held, settings, sink_k=first_k, progress=progress)
    q3 = {"evaluation": held_source, "decomposition": calib_source, "first_k": first_k,
          "rows": [{"label": r.label, "layers": list(r.layers), "first_k": r.first_k, "ppl": r.ppl,
                    "sink_mass": float(r.sink_mass.mean()), "sink_mass_by_block": r.sink_mass.tolist(),
                    "decay_ratio": float(r.decay_ratio.mean())} for r in rows],
          "seconds": t.seconds()}
    return q2, q3


def positional_figure(results: dict):
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=2, subplot_titles=(
        "first-token norm / median token norm", "sink mass (attention on the first 4 keys)",
        "distinct positional vectors (cos >= 0.95)", "log-position probe R² (held-out samples)"))
    symbols = {"embedding": "diamond", "full_attention": "circle", "sliding_attention": "triangle-up"}
    colors = ["#1f77b4", "#d62728"]
    for i, (name, r) in enumerate(results.items()):
        kinds = ["embedding", *r["layer_types"]]
        depth = [layer / r["n_layers"] for layer in range(r["n_layers"] + 1)]  # relative depth of each residual layer
        block_depth = [(b + 1) / r["n_layers"] for b in range(r["n_layers"])]
        for (row, col), y, xs, ks in (((1, 1), r["first_token_ratio"], depth, kinds),
                                      ((1, 2), r["sink_mass_by_block"], block_depth, r["layer_types"]),
                                      ((2, 1), r["n_distinct"], depth, kinds),
                                      ((2, 2), r["log_position_probe_r2"], depth, kinds)):
            fig.add_scatter(x=xs, y=y, mode="lines", line=dict(color=colors[i % 2], width=1), showlegend=False,
                            row=row, col=col)
            for kind in dict.fromkeys(ks):
                sel = [j for j, k in enumerate(ks) if k == kind]
                fig.add_scatter(x=[xs[j] for j in sel], y=[y[j] for j in sel], mode="markers",
                                marker=dict(color=colors[i % 2], symbol=symbols.get(kind, "square"), size=8),
                                name=f"{name}: {kind}", legendgroup=f"{name}{kind}", showlegend=(row, col) == (1, 1),
                                row=row, col=col)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_xaxes(title_text="relative depth (layer / n_layers)", row=2)
    fig.update_layout(title="Positional vectors and sinks by layer kind", legend=dict(orientation="h", y=-0.15),
                      margin=dict(t=70, b=100), height=650)
    return fig


def pv_removal_figure(results: dict):
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("held-out perplexity / original", "mean sink mass over blocks"))
    colors = ["#1f77b4", "#d62728"]
    for i, (name, r) in enumerate(results.items()):
        base = r["rows"][0]["ppl"]
        labels = [row["label"].replace("remove at ", "layer ") for row in r["rows"]]
        fig.add_bar(x=labels, y=[row["ppl"] / base for row in r["rows"]], name=f"{name} (original {base:.1f})",
                    marker_color=colors[i % 2], legendgroup=name, row=1, col=1)
        fig.add_bar(x=labels, y=[row["sink_mass"] for row in r["rows"]], name=name, marker_color=colors[i % 2],
                    legendgroup=name, showlegend=False, row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(title="Positional vectors removed (all positions, or the first 4 only)", barmode="group",
                      legend=dict(orientation="h", y=-0.35), margin=dict(t=70, b=140))
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# Q1: does the RoPE bound predict retrieval?
# ---------------------------------------------------------------------------------------------------------------------
def position_nll(model, tokens: torch.Tensor, length: int, bos: int | None) -> torch.Tensor:
    """Next-token NLL [length - 1] at every position of one window: BOS (when the tokenizer uses one) + the first
    text tokens, `length` tokens in all. One forward; position j's NLL is the prediction of token j + 1."""
    import torch.nn.functional as F

    body = tokens[: length - (bos is not None)]
    if body.numel() < length - (bos is not None):
        raise InputError(f"the evaluation text has {tokens.numel()} tokens, fewer than a window of {length}")
    ids = body if bos is None else torch.cat((torch.tensor([bos]), body))
    ids = ids[None].to(model.device)  # [1, length]
    with torch.inference_mode():
        logits = model(ids)[0, :-1].float()  # [length - 1, vocab]
        return F.cross_entropy(logits, ids[0, 1:], reduction="none").double().cpu()  # [length - 1]


def default_plan(lengths: Sequence[int]) -> list[tuple[str, int]]:
    """One-window perplexity, sliding-window perplexity, then passkey at each length, shortest first."""
    return [(kind, length) for length in lengths for kind in ("perplexity", "sliding", "passkey")]


def parse_plan(spec: str) -> list[tuple[str, int]]:
    """"ppl:1024,spl:1024,pk:1024" -> [("perplexity", 1024), ("sliding", 1024), ("passkey", 1024)]."""
    kinds = {"ppl": "perplexity", "spl": "sliding", "pk": "passkey"}
    plan = []
    for item in spec.split(","):
        kind, _, length = item.partition(":")
        if kind not in kinds or not length.isdigit():
            raise InputError(f"--plan: expected items like ppl:1024, spl:1024 or pk:2048, got {item!r}")
        plan.append((kinds[kind], int(length)))
    return plan


def rope_retrieval(model, *, bases: Sequence[float], plan: Sequence[tuple[str, int]], n_keys: int = 4,
                   depths: Sequence[float] = (0.0, 0.5, 1.0), eval_tokens: int | None = None,
                   methods: Sequence[str] = ("none",), text: str | None = None,
                   deadline: float | None = None, done: dict | None = None,
                   on_cell: Callable[[dict], None] | None = None, progress: bool = False) -> dict:
    """One-window perplexity (per position), sliding-window perplexity over the whole evaluation split and passkey
    accuracy with the RoPE base of every layer set at run time to each of `bases`,
    cell by cell in `plan` order ((kind, length) pairs, each run for every base). `on_cell(results)` after each cell
    lets a caller save partial results; cells already in `done` (earlier results) are kept, not rerun; a cell whose
    estimated time would pass `deadline` (a time.time()) is skipped and listed, and so is passkey at a length for a
    base that retrieved no key at a shorter length.

    `methods` other than "none" (context-extension methods of `analyses.extension`, e.g. ntk, yarn, dca) are applied on
    top of each base at factor max(1, length / trained window), the setting a model extended to that length would use;
    every row names its method. `text` replaces the evaluation split (e.g. builtin:plays/evaluation for windows longer
    than the split's 14k tokens)."""
    from residscope.analyses.extension import (apply_method, bos_token_id, evaluation_tokens, passkey_accuracy,
                                               sliding_window_perplexity, sliding_windows, trained_window)
    from residscope.analyses.rope_bound import context_bound

    head_dim = model.cfg.d_head
    tokens = evaluation_tokens(model, eval_tokens, text)  # [n]: the whole held-out split unless eval_tokens
    bos = bos_token_id(model)
    window = trained_window(model)
    res: dict = {"head_dim": head_dim, "trained_base": model.cfg.rope_of(0).theta,
                 "max_position_embeddings": model.cfg.max_position_embeddings,
                 # a resumed run keeps the methods of the earlier one (rows written before methods existed: none)
                 "methods": list(dict.fromkeys([*(done or {}).get("methods", ["none"] if done else []), *methods])),
                 "text": text or "builtin:pydoc/evaluation",
                 "bounds": {f"{b:g}": context_bound(b, head_dim).bound for b in bases},
                 # a resumed run adds its plan to the earlier one and keeps the earlier skips it does not retry
                 "plan": list(dict.fromkeys([*(done or {}).get("plan", []), *(f"{k}:{n}" for k, n in plan)])),
                 "depths": list(depths), "n_keys": n_keys,
                 **{kind: list((done or {}).get(kind, [])) for kind in ("perplexity", "sliding", "passkey")},
                 "eval_tokens": eval_tokens,
                 "skipped": [s for s in (done or {}).get("skipped", [])
                             if (s["kind"], s["length"]) not in set(plan) or s["base"] not in bases
                             or s.get("method", "none") not in methods]}

    def ppl_cell(length: int) -> dict:
        nll = position_nll(model, tokens, length, bos)  # [length - 1]
        half = nll[len(nll) // 2:]
        bins = [float(c.mean()) for c in nll.split(256)]  # mean NLL per 256 positions, for the figure
        return {"ppl": math.exp(float(nll.mean())), "ppl_second_half": math.exp(float(half.mean())),
                "n_tokens": len(nll), "nll_by_256": bins}

    def stride(length: int) -> int:
        return max(1, (length - (bos is not None)) // 2)  # sliding_window_perplexity's default

    def sliding_cell(length: int) -> dict:
        ppl, nll, n, n_windows = sliding_window_perplexity(model, tokens, length, bos=bos, batch_size=1, progress=progress)
        return {"ppl": ppl, "nll": nll, "n_tokens": n, "n_windows": n_windows, "stride": stride(length)}

    def passkey_cell(length: int, ext=None) -> dict:
        rows = passkey_accuracy(model, [length], depths, n_keys=n_keys, progress=progress, ext=ext,
                                method=ext.method if ext is not None else "none")
        return {"accuracy": statistics.fmean(r.accuracy for r in rows), "prompt_tokens": rows[0].prompt_tokens,
                "by_depth": {f"{r.depth:g}": r.accuracy for r in rows}, "answers": {f"{r.depth:g}": r.answers for r in rows}}

    def estimate(kind: str, length: int) -> float:
        """Seconds a cell should take, from the slowest measured forward (a passkey cell is one prefill per prompt, a
        sliding cell one forward per window)."""
        measured = [(r["length"], r["seconds"]) for r in res["perplexity"]]
        if not measured:
            return 0.0
        l0, s0 = max(measured)
        forward = max(s for n, s in measured if n == l0) * (length / l0) ** 1.5
        if kind == "sliding":
            body = length - (bos is not None)
            return forward * len(sliding_windows(tokens.numel(), body, stride(length), bos=bos is not None))
        return forward * (n_keys * len(depths) if kind == "passkey" else 1)

    cells = {"perplexity": ppl_cell, "sliding": sliding_cell}

    def method_of(row: dict) -> str:
        return row.get("method", "none")  # rows written before methods existed are direct (no extension)

    for kind, length in plan:
        for method in methods:
            for base in bases:
                if any(r["base"] == base and r["length"] == length and method_of(r) == method for r in res[kind]):
                    continue
                cell = {"kind": kind, "base": base, "length": length, "method": method}
                failed = [r["length"] for r in res["passkey"] if r["base"] == base and method_of(r) == method
                          and r["accuracy"] == 0 and r["length"] < length]
                if kind == "passkey" and failed:
                    res["skipped"].append({**cell, "why": f"no key retrieved at {min(failed)} tokens already"})
                    continue
                if deadline is not None and time.time() + estimate(kind, length) > deadline:
                    res["skipped"].append({**cell, "why": "would not finish in time"})
                    continue
                t = Timer()
                with model.positional_overrides():
                    model.set_rope(theta=base)
                    with apply_method(model, method, max(1.0, length / window)) as ext:
                        if ext.fwd_hooks:
                            raise InputError(f"--methods: {method} works through hooks; rope-retrieval takes ntk, yarn, "
                                             "pi, dynamic-ntk, dca or window")
                        row = passkey_cell(length, ext) if kind == "passkey" else cells[kind](length)
                        settings = ext.settings
                res[kind].append({"base": base, "length": length, "method": method, "settings": settings,
                                  "seconds": t.seconds(), **row})
                if on_cell is not None:
                    on_cell(res)
    return res


def rope_retrieval_figure(res: dict):
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("keys retrieved (solid: key at the start, dashed: middle)",
                                                        "perplexity (solid: sliding, dashed: one window's 2nd half)"))
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
    methods = res.get("methods", ["none"])
    series = [(label, bound, m) for label, bound in res["bounds"].items() for m in methods]
    for i, (label, bound, method) in enumerate(series):
        base = float(label)
        c = colors[i % len(colors)]
        name = f"base {label} (bound {bound:,})" + (f", {method}" if method != "none" else "")
        label = f"{label}-{method}"
        # depth 0 and 0.5 put the key about L and L/2 tokens from the question: the depths that test distance
        curves = [(1, "passkey", lambda r: r["by_depth"].get("0"), "solid"),
                  (1, "passkey", lambda r: r["by_depth"].get("0.5"), "dash"),
                  (2, "sliding", lambda r: r["ppl"], "solid"), (2, "perplexity", lambda r: r["ppl_second_half"], "dash")]
        shown = False
        for col, kind, value, dash in curves:
            xy = sorted((r["length"], value(r)) for r in res.get(kind, [])
                        if r["base"] == base and r.get("method", "none") == method and value(r) is not None)
            # shifted sideways by base (2.5% of the longest length), so equal accuracies stay visible
            dodge = (i - 1) * 0.025 * max((r["length"] for r in res["passkey"]), default=0) if col == 1 else 0
            if xy:
                fig.add_scatter(x=[x + dodge for x, _ in xy], y=[y for _, y in xy], mode="lines+markers", name=name,
                                line=dict(color=c, dash=dash), legendgroup=label, showlegend=not shown, row=1, col=col)
                shown = True
        for col in (1, 2) if method == methods[0] else ():
            fig.add_vline(x=bound, line_dash="dot", line_color=c, row=1, col=col)
    fig.update_xaxes(title_text="tokens (dotted: context bound of each base)")
    fig.update_annotations(font_size=13)
    fig.update_yaxes(range=[-0.05, 1.05], row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title=f"RoPE base vs retrieval (head dim {res['head_dim']}, trained base {res['trained_base']:g})",
                      legend=dict(orientation="h", y=-0.2), margin=dict(t=70, b=90))
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------
def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _depths(s: str) -> list[float]:
    try:
        depths = _floats(s)
    except ValueError:
        depths = []
    if not depths or not all(0 <= d <= 1 for d in depths):
        raise InputError(f"--depths: expected comma-separated numbers in [0, 1], got {s!r}")
    return depths


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m residscope.studies.findings", description=__doc__.split("\n\n")[0])
    p.add_argument("question", choices=QUESTIONS)
    p.add_argument("--out", type=Path, default=Path("docs/findings"), help="folder for <question>.json and its figure")
    p.add_argument("--models", default=None, help="comma-separated models (default per question)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration / evaluation sequence")
    p.add_argument("--samples", type=int, default=16, help="calibration sequences")
    p.add_argument("--eval-samples", type=int, default=8, help="held-out evaluation sequences")
    p.add_argument("--seeds", type=int, default=3, help="shortgpt: seeds of the random baseline")
    p.add_argument("--attn-samples", type=int, default=8, help="positional: sequences for attention statistics and probes")
    p.add_argument("--probe-tokens", type=int, default=2048, help="positional: tokens for the log-position probe")
    p.add_argument("--head-dim", type=int, default=128, help="rope-table: head dim")
    p.add_argument("--lengths-table", default=None, help="rope-table: lengths (default: the paper's 1k .. 1M)")
    p.add_argument("--bases", default="1e4,1e5,1e6", help="rope-retrieval: RoPE bases set at run time")
    p.add_argument("--lengths", default="1024,2048,3072,4096,6144,8192", help="rope-retrieval: window / prompt lengths")
    p.add_argument("--plan", default=None, help="rope-retrieval: cell order like ppl:1024,spl:1024,pk:1024 (one-window "
                   "perplexity, sliding-window perplexity, passkey; default: all three at each length, shortest first)")
    p.add_argument("--resume", action="store_true", help="keep the results of an earlier run in --out (models / cells done)")
    p.add_argument("--force", action="store_true", help="replace this question's earlier results in --out")
    p.add_argument("--depths", default="0,0.5,1", help="rope-retrieval: passkey depths in [0, 1]")
    p.add_argument("--keys", type=int, default=4, help="rope-retrieval: passkeys per length and depth")
    p.add_argument("--methods", default="none", help="rope-retrieval: context-extension methods applied on top of each "
                   "base at factor length / trained window (none, pi, ntk, dynamic-ntk, yarn, dca, window)")
    p.add_argument("--text", default=None, help="rope-retrieval: text for the perplexity cells instead of the evaluation "
                   "split (e.g. builtin:plays/evaluation for windows past its 14k tokens)")
    p.add_argument("--eval-tokens", type=int, default=None, help="rope-retrieval: read only the first N tokens of the "
                   "evaluation split (default: all of it)")
    p.add_argument("--deadline", default=None, help="rope-retrieval: HH:MM (UTC) after which no new cell starts")
    args = p.parse_args(argv)
    out = args.out
    check_result_files(out, args.question, replace=args.force or args.resume)
    out.mkdir(parents=True, exist_ok=True)
    git_commit()
    t = Timer()

    if args.question == "rope-table":
        res = rope_table(args.head_dim, _ints(args.lengths_table) if args.lengths_table else None)
        write_json(out, "rope-table", {**res, "seconds": t.seconds()})
        write_figure(rope_table_figure(res), out, "rope-table")
    elif args.question == "shortgpt":
        names = (args.models or "smollm2-135m,gemma3-270m").split(",")
        path = out / "shortgpt.json"
        results = json.loads(path.read_text())["models"] if args.resume and path.exists() else {}
        for name in names:
            if results.get(name, {}).get("version") == SHORTGPT_VERSION:
                continue
            results[name] = shortgpt(_load(name), seq_len=args.seq_len, samples=args.samples,
                                     eval_samples=args.eval_samples, seeds=args.seeds)
            write_json(out, "shortgpt", {"models": results})
        write_figure(shortgpt_figure(results), out, "shortgpt")
    elif args.question == "positional":
        names = (args.models or "gemma3-270m,smollm2-135m").split(",")
        path = out / "positional.json"
        q2 = json.loads(path.read_text())["models"] if args.resume and path.exists() else {}
        q3 = json.loads((out / "pv-removal.json").read_text())["models"] if q2 and (out / "pv-removal.json").exists() else {}
        for name in names:
            if name in q2 and name in q3:
                continue
            q2[name], q3[name] = positional_study(_load(name), seq_len=args.seq_len, samples=args.samples,
                                                  eval_samples=args.eval_samples, probe_tokens=args.probe_tokens,
                                                  attn_samples=args.attn_samples)
            write_json(out, "positional", {"models": q2})
            write_json(out, "pv-removal", {"models": q3})
        write_figure(positional_figure(q2), out, "positional")
        write_figure(pv_removal_figure(q3), out, "pv-removal")
    elif args.question == "rope-retrieval":
        model_name = (args.models or "smollm2-135m").split(",")[0]
        model = _load(model_name)
        deadline = _deadline(args.deadline) if args.deadline else None

        previous = out / "rope-retrieval.json"
        done = json.loads(previous.read_text()) if args.resume and previous.exists() else None
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        from residscope.analyses.extension import METHODS
        for m in methods:
            if m not in METHODS or m == "pv-replace":
                raise InputError(f"--methods: unknown or unsupported method {m!r} (choose from none, pi, ntk, "
                                 "dynamic-ntk, yarn, dca, window)")
        text = args.text or "builtin:pydoc/evaluation"
        for key, value in (("model", model_name), ("eval_tokens", args.eval_tokens), ("text", text)):
            if done is not None and done.get(key, "builtin:pydoc/evaluation" if key == "text" else None) != value:
                raise InputError(f"--resume: {previous} holds results for {key} {done.get(key)!r}, not {value!r}; "
                                 "use another --out")

        def save(res: dict) -> None:  # seconds: summed over the runs that filled the file
            seconds = round((done or {}).get("seconds", 0) + t.seconds(), 1)
            write_json(out, "rope-retrieval", {"model": model_name, "seconds": seconds, **res})

        plan = parse_plan(args.plan) if args.plan else default_plan(_ints(args.lengths))
        res = rope_retrieval(model, bases=_floats(args.bases), plan=plan, n_keys=args.keys, deadline=deadline,
                             depths=_depths(args.depths),
                             eval_tokens=args.eval_tokens, methods=methods, text=args.text, done=done, on_cell=save)
        save(res)
        write_figure(rope_retrieval_figure(res), out, "rope-retrieval")
    print(f"{args.question}: done in {t.seconds()} s -> {out}")
    return 0


def check_result_files(out: Path, question: str, *, replace: bool) -> None:
    """Before any work: --out is a writable folder and holds no earlier results of this question unless `replace`
    (--force, or --resume which extends them); other questions' files in the same folder are left alone."""
    from residscope.common.atomic import check_output_file

    for name in RESULT_NAMES[question]:
        for path in (out / f"{name}.json", out / f"{name}.png", out / f"{name}.html"):
            check_output_file(path, "--out")
            if path.exists() and not replace:
                raise InputError(f"--out: {path} holds earlier results (use --force to replace them, --resume to extend them)")


def _deadline(hhmm: str) -> float:
    import datetime as dt

    h, m = (int(x) for x in hhmm.split(":"))
    now = dt.datetime.now(dt.timezone.utc)
    target = now.replace(hour=h, minute=m, second=0, microsecond=0)
    if target < now:
        target += dt.timedelta(days=1)
    return target.timestamp()


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except InputError as e:  # a user's mistake: one line, exit 2, as the residscope CLI does
        raise SystemExit(f"findings: error: {str(e).splitlines()[0]}") from None
