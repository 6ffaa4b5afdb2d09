"""The explorer's pages: one function per page, each `page(source)` with `source` the model picked in the sidebar.

Pages lay out widgets and figures only; every number comes from `explorer_cache` (cached library calls) and every
figure from the library's plot modules, or from small plotly figures of arrays the library returned.
Defaults are small enough to render in a few seconds on the bundled model; heavier work waits for a button.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from residscope.model.errors import InputError

from . import explorer_cache as cache
from .cli_common import parse_fractions, parse_lengths

DEFAULT_PROMPT = "The capital of France is Paris. The capital of Germany is"


def show(fig: go.Figure, key: str | None = None) -> None:
    """A plotly figure in Streamlit's theme (light or dark, whichever the viewer uses)."""
    # The library's figures name plotly_white for standalone HTML; here the template must follow the app's theme.
    fig.update_layout(template=None)
    st.plotly_chart(fig, theme="streamlit", key=key)


def computing(label: str):
    return st.spinner(label, show_time=True)


def prompt_text() -> str:
    return st.session_state.get("prompt") or DEFAULT_PROMPT


def position_limit(source: str) -> int | None:
    """The longest sequence the model can take at all: the size of its learned position table (GPT-2, OPT). None for
    relative positions (RoPE, ALiBi, none), which run past their trained window (an extension study's subject)."""
    cfg = cache.model(source).cfg
    return cfg.max_position_embeddings if cfg.positional == "learned" else None


def tokens_per_sample(container, source: str, key: str, default: int = 128) -> int:
    """The "Tokens per sample" input, capped at the learned position table where there is one."""
    limit = position_limit(source)
    top = min(2048, limit) if limit else 2048
    return int(container.number_input("Tokens per sample", 8, top, min(default, top), step=32, key=key,
                                      help=f"at most {limit}: the model's learned positions" if limit else None))


# ---- 1. prompt, tokens, next-token predictions, logit lens --------------------------------------------------------
def page_tokens(source: str) -> None:
    st.header("Prompt, tokens and the logit lens")
    new_tokens = st.slider("Greedy continuation (new tokens)", 0, 32, 12, key="new_tokens")
    with computing("Running the prompt through the model..."):
        run = cache.prompt_run(source, prompt_text(), 10, new_tokens)
    c1, c2, c3 = st.columns(3)
    c1.metric("Prompt tokens", len(run.tokens))
    c2.metric("Top next token", run.top_tokens[0])
    c3.metric("Its probability", f"{run.top_probs[0]:.3f}")
    if new_tokens:
        st.markdown("**Greedy continuation**")
        st.code(prompt_text() + run.continuation, language=None, wrap_lines=True)

    left, right = st.columns([1, 2])
    with left:
        st.subheader("Tokens")
        st.dataframe({"position": list(range(len(run.tokens))), "id": run.token_ids, "token": run.tokens},
                     hide_index=True, height=320)
    with right:
        st.subheader("Next-token predictions")
        labels = [f"{rank}. {t}" for rank, t in enumerate(run.top_tokens, 1)]  # ranks: several ids can decode alike
        fig = go.Figure(go.Bar(x=run.top_probs[::-1], y=labels[::-1], orientation="h",
                               text=[f"{p:.3f}" for p in run.top_probs[::-1]], textposition="auto",
                               customdata=run.top_logits[::-1],
                               hovertemplate="%{y}: p = %{x:.4f}, logit %{customdata:.2f}<extra></extra>"))
        fig.update_layout(title="Top 10 after the last token", xaxis_title="probability", height=340,
                          margin=dict(l=10, r=10, t=40, b=10))
        show(fig, key="next_token")

    st.subheader("Logit lens")
    st.caption("Final norm and unembedding applied to every `blocks.{i}.hook_resid_post`: the lens's top token at each "
               "layer (text) and a probability (colour).")
    colour = st.radio("Colour", ["probability of the lens's top token", "probability of the model's final prediction"],
                      horizontal=True, key="lens_colour")
    z = run.lens_probs if colour.startswith("probability of the lens") else run.lens_target_probs
    layers = list(range(z.shape[0]))
    x = [f"{t}:{tok}" for t, tok in enumerate(run.tokens)]
    fig = go.Figure(go.Heatmap(z=z, x=x, y=layers, zmin=0, zmax=1, colorscale="Viridis", text=run.lens_tokens,
                               texttemplate="%{text}", textfont=dict(size=9), colorbar=dict(title="p"),
                               hovertemplate="block %{y}, after %{x}: %{text} (p %{z:.3f})<extra></extra>"))
    fig.update_layout(xaxis_title="position: input token", yaxis_title="block (resid_post)",
                      height=max(360, 22 * len(layers) + 120), xaxis=dict(type="category"))
    show(fig, key="logit_lens")


# ---- 2. attention patterns and sinks --------------------------------------------------------------------------------
def page_attention(source: str) -> None:
    from residscope.analyses import positional_plots

    st.header("Attention patterns and sinks")
    first_k = st.number_input("Sink tokens: the first k positions", 1, 16, 1, key="attn_first_k")
    with computing("Collecting attention patterns..."):
        tokens, patterns, layers, stats = cache.prompt_attention(source, prompt_text(), int(first_k))
    n_layers, n_heads = patterns.shape[:2]
    c1, c2 = st.columns(2)
    layer_pos = c1.slider("Block", 0, n_layers - 1, 0, key="attn_layer")
    head = c2.slider("Head", 0, n_heads - 1, 0, key="attn_head")
    layer = layers[layer_pos]
    sink = stats.sink_mass  # [layer, head]
    m1, m2, m3 = st.columns(3)
    m1.metric(f"Sink mass, block {layer} head {head}", f"{sink[layer_pos, head]:.3f}")
    m2.metric(f"Sink mass, block {layer} (mean of heads)", f"{sink[layer_pos].mean():.3f}")
    m3.metric("Sink mass, all blocks and heads", f"{sink.mean():.3f}")
    st.caption(f"Sink mass: attention from queries at positions >= {stats.first_k} on the first {stats.first_k} "
               "token(s), averaged over those queries.")

    x = [f"{t}:{tok}" for t, tok in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=patterns[layer_pos, head], x=x, y=x, zmin=0, zmax=1, colorscale="Viridis",
                               colorbar=dict(title="attention"),
                               hovertemplate="query %{y} -> key %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"Attention pattern, block {layer}, head {head}", xaxis_title="key", yaxis_title="query",
                      yaxis_autorange="reversed", height=520, xaxis=dict(type="category"), yaxis=dict(type="category"))
    left, right = st.columns(2)
    with left:
        show(fig, key="pattern")
    with right:
        show(positional_plots.sink_mass(stats), key="sink_prompt")

    st.subheader("Over the calibration corpus")
    c1, c2 = st.columns(2)
    samples = c1.number_input("Samples", 1, 256, 8, key="attn_samples")
    seq_len = tokens_per_sample(c2, source, "attn_seq_len")
    if st.button("Compute sink statistics over the corpus", key="attn_corpus_button"):
        st.session_state["attn_corpus"] = (int(samples), int(seq_len), int(first_k))
    if st.session_state.get("attn_corpus"):
        samples_, seq_len_, first_k_ = st.session_state["attn_corpus"]
        with computing(f"Attention over {samples_} x {seq_len_} calibration tokens..."):
            corpus_stats, description = cache.corpus_attention(source, samples_, seq_len_, first_k_)
        decay = corpus_stats.decay_ratio()  # [layer, head]
        m1, m2 = st.columns(2)
        m1.metric("Corpus sink mass (mean of blocks and heads)", f"{corpus_stats.sink_mass.mean():.3f}")
        m2.metric("Decay ratio near/far (median head)", f"{np.median(decay):.2f}")
        st.caption(description)
        left, right = st.columns(2)
        with left:
            show(positional_plots.sink_mass(corpus_stats), key="sink_corpus")
        with right:
            show(positional_plots.attention_by_distance(corpus_stats), key="distance")

    st.subheader("At long lengths (16k-32k), by query chunks")
    st.caption("Sink mass, attention entropy, attended distance and per-position loss in one forward per sample; the "
               "pattern is reduced a block of query rows at a time and never held whole (whole patterns are refused "
               "past 8,192 tokens). Text: Shakespeare's plays (builtin:plays/evaluation). SmolLM2 at 16k takes minutes.")
    limit = position_limit(source)
    if limit is not None and limit < 256:
        st.info(f"This model has {limit} learned positions: no sequence reaches the lengths this section studies.")
        return
    c1, c2, c3 = st.columns(3)
    lc_len = c1.number_input("Tokens", 256, min(65536, limit or 65536), min(4096, limit or 4096), step=1024,
                             key="lc_len")
    lc_samples = c2.number_input("Samples", 1, 16, 1, key="lc_samples")
    methods = ["none", *[m for m in cache.extension_methods(source) if m not in ("none", "pv-replace")]]
    lc_method = c3.selectbox("Extension method", methods, key="lc_method")
    if st.button("Compute long-context statistics", key="lc_button"):
        st.session_state["lc"] = (int(lc_len), int(lc_samples), lc_method, int(first_k))
    if st.session_state.get("lc"):
        from residscope.analyses import long_context_plots

        lc_len_, lc_samples_, lc_method_, first_k_ = st.session_state["lc"]
        with computing(f"Attention statistics at {lc_len_:,} tokens ({lc_method_})..."):
            lc = cache.long_context(source, lc_len_, lc_samples_, "builtin:plays/evaluation", first_k_, lc_method_)
        m1, m2, m3 = st.columns(3)
        m1.metric("Loss (mean over positions)", f"{lc.loss:.3f}")
        m2.metric("Sink mass (mean of blocks and heads)", f"{lc.sink_mass.mean():.3f}")
        m3.metric("Mean attended distance (tokens)", f"{lc.mean_distance.mean():,.0f}")
        st.caption(lc.source)
        show(long_context_plots.statistics_figure(lc), key="lc_stats")
        which = st.radio("Against query position", ["sink", "entropy", "distance"], horizontal=True, key="lc_which")
        show(long_context_plots.by_position_figure(lc, which), key="lc_by_position")


# ---- 3. residual stream norms and positional vectors --------------------------------------------------------------
def page_residual(source: str) -> None:
    from residscope.analyses import positional_plots

    st.header("Residual stream norms and positional vectors")
    st.caption("Mean-based decomposition over calibration chunks: the positional vector p[l, t] is the mean of the "
               "residual stream at layer l and position t over samples (layer 0 = embeddings).")
    c1, c2, c3, c4 = st.columns(4)
    samples = int(c1.number_input("Samples", 2, 512, 8, key="pos_samples"))
    seq_len = tokens_per_sample(c2, source, "pos_seq_len")
    first_k = int(c3.number_input("First k tokens", 1, 16, 4, key="pos_first_k"))
    threshold = float(c4.slider("Cosine for 'same vector'", 0.5, 1.0, 0.95, key="pos_cos"))
    with computing(f"Decomposing {samples} x {seq_len} tokens..."):
        dec, desc, description = cache.positional(source, samples, seq_len, first_k, threshold)
    last = desc.positional_r2.shape[0] - 1
    m1, m2, m3, m4 = st.columns(4)
    m1.metric(f"Positional R² (t >= {desc.first_k}), last layer", f"{desc.positional_r2_after_first_k[last]:.3f}")
    m2.metric("Distinct positional vectors, last layer", int(desc.n_distinct[last]))
    peak = int(np.argmax(desc.first_token_ratio[:, 0]))
    m3.metric("Max first-token norm / median", f"{desc.first_token_ratio[peak, 0]:.1f}x", f"layer {peak}",
              delta_color="off")
    m4.metric("Samples x tokens", f"{dec.n_samples} x {dec.seq_len}")
    st.caption(description)

    norms = np.log10(np.maximum(dec.mean_token_norm.numpy(), 1e-12))  # [layer, pos]
    fig = go.Figure(go.Heatmap(z=norms, colorscale="Viridis", colorbar=dict(title="log10 E||h||"),
                               hovertemplate="layer %{y}, position %{x}: log10 E||h|| = %{z:.2f}<extra></extra>"))
    fig.update_layout(title="Residual stream norm E||h[l, t]|| (mean over samples)", xaxis_title="position",
                      yaxis_title="layer (0 = embeddings)")
    tabs = st.tabs(["Residual norms", "Positional-vector norms", "Similarity", "PCA", "By layer"])
    with tabs[0]:
        show(fig, key="resid_norms")
    with tabs[1]:
        show(positional_plots.norms_heatmap(desc), key="pv_norms")
    with tabs[2]:
        show(positional_plots.similarity_matrices(desc), key="pv_similarity")
    with tabs[3]:
        show(positional_plots.pca_trajectories(desc), key="pv_pca")
    with tabs[4]:
        show(positional_plots.layer_summary(desc), key="pv_layers")


# ---- 4. RoPE bound ----------------------------------------------------------------------------------------------
SCALINGS = {"none": "none", "linear (PI)": "pi", "NTK-aware base": "ntk", "YaRN": "yarn", "dynamic NTK": "dynamic-ntk"}  # -> method


def page_rope(source: str) -> None:
    st.header("RoPE base and context length")
    st.caption("B(m) = Σᵢ cos(m θᵢ) must stay ≥ 0 for every distance m the model sees (Men et al., 2024); the context "
               "bound is the largest L with B(m) ≥ 0 on [0, L].")
    lm = cache.model(source)
    cfg = lm.cfg
    own = cache.model_bounds(source)
    if own is None:
        st.info(f"This {cfg.model_type} model has no rotary positions ({cfg.positional!r}): it has no RoPE bound. The "
                "calculator below is for a RoPE head you describe, not for this model.")
    base0 = float(own[0].base) if own else 10000.0
    c1, c2, c3, c4, c5 = st.columns(5)
    base = float(c1.number_input("Base θ", 2.0, 1e12, base0, format="%g", key="rope_base"))
    # the rotated dims: a partial-rotary head (Phi-3, GPT-NeoX) rotates only the first rotary_dim of its dims
    rotated = int(own[0].rotary_dim) if own else int(cfg.d_head)
    head_dim = int(c2.number_input("Rotated dims", 2, 1024, rotated, step=2, key="rope_head_dim"))
    scaling = c3.selectbox("Scaling", list(SCALINGS), key="rope_scaling")
    factor = float(c4.number_input("Factor s", 1.0, 1024.0, 4.0, key="rope_factor", disabled=scaling == "none"))
    window = int(c5.number_input("Trained window", 16, 1 << 22, int(cfg.max_position_embeddings or 4096),
                                 key="rope_window", disabled=scaling in ("none", "linear (PI)", "NTK-aware base")))
    if head_dim % 2:
        raise InputError(f"head dim must be even, got {head_dim}")
    with computing("Scanning B(m)..."):
        plain, m, b_plain, _ = cache.rope_curve(base, head_dim, "none", 1.0, window, 1 << 20)
        if scaling != "none":
            scaled, _, b_scaled, scaled_base = cache.rope_curve(base, head_dim, SCALINGS[scaling], factor, window, 1 << 20)

    def fmt(bound) -> str:
        return f"≥ {bound.bound:,}" if bound.capped else f"{bound.bound:,}"

    m1, m2, m3 = st.columns(3)
    m1.metric(f"Context bound, base {base:g}", fmt(plain))
    if scaling != "none":
        m2.metric(f"Context bound, {scaling} x{factor:g}", fmt(scaled))
        m3.metric("Scaled / unscaled", f"{scaled.bound / max(plain.bound, 1):.2f}x")
        if SCALINGS[scaling] == "ntk":
            st.caption(f"NTK-aware base: {scaled_base:.6g}")
    fig = go.Figure(go.Scatter(x=m, y=b_plain, mode="lines", name=f"base {base:g}"))
    if scaling != "none":
        fig.add_trace(go.Scatter(x=m, y=b_scaled, mode="lines", name=f"{scaling} x{factor:g}"))
    fig.add_hline(y=0, line_dash="dash", line_color="gray")
    for bound, name in [(plain, f"base {base:g}")] + ([(scaled, f"{scaling} x{factor:g}")] if scaling != "none" else []):
        if not bound.capped:  # a marker, not a vline: plotly shapes on a log axis take log10 coordinates
            fig.add_trace(go.Scatter(x=[bound.first_negative], y=[0], mode="markers+text", marker_symbol="x",
                                     marker_size=11, text=[f"{bound.first_negative:,}"], textposition="top center",
                                     name=f"first B < 0, {name}"))
    fig.update_layout(title=f"B(m), head dim {head_dim}", xaxis_title="relative distance m", yaxis_title="B(m)",
                      xaxis_type="log")
    show(fig, key="b_curve")

    st.subheader("The model's own RoPE")
    if own is None:
        st.caption(f"None: {source} uses {cfg.positional!r} positions.")
    else:
        st.dataframe([{"layers": f"{k.layer_kind} ({len(k.layers)})", "head dim": k.head_dim, "rotary dim": k.rotary_dim,
                       "base": f"{k.base:g}", "scaling": "none" if k.rope_type == "default" else f"{k.rope_type} x{k.factor:g}",
                       "context bound": fmt(k.bound), "max positions": k.max_position_embeddings,
                       "window": k.sliding_window, "covers what it sees": k.covers_max_positions} for k in own],
                     hide_index=True)
        ropes = lm.rope_settings()
        nope = [i for i in lm.attention_layers() if ropes[i] is None]
        if nope:
            st.caption(f"Layers {nope} apply no rotary position at all (NoPE): they have no RoPE bound.")

    st.subheader("Smallest base for a context length")
    c1, c2 = st.columns(2)
    length = int(c1.number_input("Context length L", 16, 1 << 20, 4096, key="rope_length"))
    if c2.button("Compute the lower bound of the base", key="rope_lb_button"):
        st.session_state["rope_lb"] = (length, head_dim)
    if st.session_state.get("rope_lb"):
        length_, head_dim_ = st.session_state["rope_lb"]
        with computing(f"Sweeping bases for L = {length_:,}..."):
            lb = cache.base_lower_bound(length_, head_dim_)
        st.metric(f"Base lower bound, L = {length_:,}, head dim {head_dim_}", f"{lb.value:.6g}")
        st.caption(f"verified: {lb.verified}; base {lb.below:.6g} just below fails at m = {lb.below_first_negative:,}; "
                   f"this base reaches {'≥ ' if lb.reach_capped else ''}{lb.reach:,}. B is not monotone in the base.")

    with st.expander("The paper's table (head dim 128), next to the published values"):
        if st.button("Compute 1k, 4k, 16k", key="rope_table_button"):
            st.session_state["rope_table"] = True
        if st.session_state.get("rope_table"):
            from residscope.analyses.rope_bound_plots import bound_figure

            with computing("Computing lower bounds..."):
                rows = cache.paper_table(128, (1 << 10, 1 << 12, 1 << 14))
            st.dataframe([{"length": r.length, "computed": f"{r.computed.value:.5g}",
                           "published": f"{r.published:.2g}" if r.published else "-", "note": r.note} for r in rows],
                         hide_index=True)
            show(bound_figure(rows), key="bound_table")


# ---- 5. Block Influence and pruning ---------------------------------------------------------------------------------
METRICS = ("bi", "angular", "relative-magnitude")


def page_pruning(source: str) -> None:
    from residscope.surgery.influence import removal_order
    from residscope.surgery.plots import comparison_figure, influence_figure

    st.header("Layer pruning: Block Influence (ShortGPT) and the criteria since")
    lm = cache.model(source)
    n_layers = lm.cfg.n_layers
    c1, c2, c3 = st.columns(3)
    metric = c1.selectbox("Metric", METRICS, key="bi_metric")
    samples = int(c2.number_input("Calibration samples", 1, 256, 8, key="bi_samples"))
    seq_len = tokens_per_sample(c3, source, "bi_seq_len")
    with computing(f"Scoring {n_layers} blocks on {samples} x {seq_len} tokens..."):
        result = cache.influence(source, metric, samples, seq_len)
    n_remove = st.slider("Layers to remove", 1, n_layers - 1, max(1, round(0.25 * n_layers)), key="bi_n_remove")
    suggested = removal_order(result, n_remove)
    show(influence_figure(result, highlight=n_remove), key="influence")
    chosen = st.multiselect("Remove these layers (least influential first; edit freely)", list(range(n_layers)),
                            default=suggested, key=f"bi_layers_{metric}_{n_remove}_{samples}_{seq_len}")
    if st.button("Prune in memory and compare", key="bi_prune", disabled=not chosen or len(chosen) >= n_layers):
        st.session_state["bi_pruned"] = tuple(sorted(int(i) for i in chosen))
    removed = st.session_state.get("bi_pruned")
    if not removed:
        st.info("Pick layers, then prune: generations and held-out perplexity before and after appear here.")
    elif max(removed) >= n_layers:  # a pruning left over from another model
        st.session_state.pop("bi_pruned")
        st.rerun()
    else:
        _pruned_section(source, result, removed, n_layers, seq_len)
    _criteria_section(source, n_layers, n_remove, samples, seq_len)
    _healing_section()


def _pruned_section(source: str, result, removed: tuple[int, ...], n_layers: int, seq_len: int) -> None:
    from residscope.surgery.plots import comparison_figure

    c1, c2 = st.columns(2)
    eval_samples = int(c1.number_input("Held-out samples", 1, 256, 8, key="bi_eval_samples"))
    new_tokens = int(c2.number_input("New tokens", 1, 64, 16, key="bi_new_tokens"))
    with computing(f"Removing layers {list(removed)}, generating and measuring perplexity..."):
        dense_ppl = cache.heldout_ppl(source, (), eval_samples, seq_len)
        pruned_ppl = cache.heldout_ppl(source, removed, eval_samples, seq_len)
        before = cache.generation(source, (), prompt_text(), new_tokens)
        after = cache.generation(source, removed, prompt_text(), new_tokens)
    m1, m2, m3 = st.columns(3)
    m1.metric("Layers", f"{n_layers} → {n_layers - len(removed)}")
    m2.metric("Held-out perplexity, dense", f"{dense_ppl.ppl:.3f}")
    m3.metric("Held-out perplexity, pruned", f"{pruned_ppl.ppl:.3f}", f"{pruned_ppl.ppl - dense_ppl.ppl:+.3f}",
              delta_color="inverse")
    st.caption(f"Removed layers {list(removed)}; perplexity on {dense_ppl.source}.")
    left, right = st.columns(2)
    left.markdown("**Dense model**")
    left.code(prompt_text() + before, language=None, wrap_lines=True)
    right.markdown(f"**Without layers {list(removed)}**")
    right.code(prompt_text() + after, language=None, wrap_lines=True)
    show(comparison_figure([{"method": "dense", "ppl": dense_ppl.ppl},
                            {"method": f"{len(removed)} removed", "ppl": pruned_ppl.ppl}], dense_ppl=dense_ppl.ppl,
                           title="Held-out perplexity before and after"), key="ppl_compare")

    st.subheader("Export the pruned model")
    folder = st.text_input("Folder (new or empty)", key="bi_export_folder", placeholder="out/pruned")
    if st.button("Export as a transformers checkpoint", key="bi_export"):
        with computing(f"Writing {folder}..."):
            path = cache.export_pruned(source, removed, folder, result,
                                       {"dense": dense_ppl.ppl, "pruned": pruned_ppl.ppl})
        st.success(f"Saved to {path} (config.json, model.safetensors, tokenizer, residscope_pruning.json)")
    _pruning_gguf(source, removed)
    _pruning_evaluation(source, removed, seq_len)


def _pruning_gguf(source: str, removed: tuple[int, ...]) -> None:
    from residscope.model.gguf_export import QUANTS

    c1, c2 = st.columns([3, 1])
    path = c1.text_input("GGUF file (new) for llama.cpp", key="bi_gguf_path", placeholder="out/pruned.gguf")
    quant = c2.selectbox("Quantization", QUANTS, key="bi_gguf_quant")
    if st.button("Export as GGUF", key="bi_gguf"):
        with computing(f"Writing {path} ({quant})..."):
            written = cache.export_gguf(source, removed, path, quant)
        st.success(f"Wrote {written.path}: {written.n_layers} layers, {written.n_bytes / 2**20:.1f} MiB "
                   f"({', '.join(f'{n} {t}' for t, n in sorted(written.tensor_types.items()))})")


def _pruning_evaluation(source: str, removed: tuple[int, ...], seq_len: int) -> None:
    """What the cut breaks beyond perplexity: the offline tasks before/after, and the block-by-block view of the cut."""
    import pandas as pd

    from residscope.analyses.evaluation import TASKS, compare_reports
    from residscope.surgery.cut_plots import cut_figure

    st.subheader("What the cut breaks")
    c1, c2 = st.columns([3, 1])
    tasks = tuple(c1.multiselect("Tasks", TASKS, default=["addition", "brackets", "cloze"], key="ev_tasks"))
    n = int(c2.number_input("Items per task", 1, 64, 8, key="ev_n"))
    if not st.button("Evaluate dense and pruned", key="ev_run", disabled=not tasks):
        return
    with computing(f"Running {', '.join(tasks)} on both models and comparing their blocks..."):
        before = cache.evaluation(source, (), tasks, n)
        after = cache.evaluation(source, removed, tasks, n)
        cut = cache.cut(source, removed, 4, min(seq_len, 128))
    st.dataframe(pd.DataFrame([vars(r) for r in compare_reports(before, after)]), hide_index=True)
    show(cut_figure(cut), key="cut_figure")
    st.caption("Blocks at their original index; the pruned model's blocks that sit after a removed span show whether "
               "they took over its work (their lens agreement with the final prediction) and how the attention sink "
               "and the first token's massive norm moved.")


def _criteria_section(source: str, n_layers: int, n_remove: int, samples: int, seq_len: int) -> None:
    from residscope.surgery.criteria import BASELINES, CRITERIA
    from residscope.surgery.plots import comparison_figure

    st.subheader("Compare the criteria, and how much each choice moves")
    st.caption("Every criterion chooses on the same calibration tokens; each chooses again on a second, disjoint slice "
               "of the same size: overlap = share of the chosen blocks both slices pick; rank corr = Spearman "
               "correlation of the per-layer scores (criteria that score every layer). sleb and blockprune run one "
               "forward per candidate step and are slow on large models.")
    picks = st.multiselect("Criteria", [c for c in CRITERIA if c != "random"],
                           default=["bi", "angular", "angular-block", "ppl", "taylor", "reverse"], key="crit_pick")
    eval_samples = int(st.number_input("Held-out samples", 1, 256, 4, key="crit_eval_samples"))
    if not st.button("Run the comparison", key="crit_run", disabled=not picks):
        return
    with computing(f"{len(picks)} criteria choosing {n_remove} of {n_layers} blocks on two slices of {samples} x "
                   f"{seq_len} tokens..."):
        try:
            cmp = cache.compare_criteria(source, tuple(picks), n_remove, samples, seq_len, eval_samples)
        except InputError as e:
            st.error(str(e))
            return
    text = lambda order: ", ".join(f"{x[0]}.{x[1]}" if isinstance(x, (list, tuple)) else str(x) for x in order)  # noqa: E731
    st.dataframe([{"criterion": r.method, "held-out ppl": round(r.ppl, 3), "x dense": round(r.ppl / cmp.dense.ppl, 2),
                   "overlap": r.overlap, "rank corr": None if r.rank_correlation is None else round(r.rank_correlation, 3),
                   "removed": text(r.removed or []), "removed (2nd slice)": text(r.removed_b or []),
                   "seconds": None if r.seconds is None else round(r.seconds, 1)} for r in cmp.rows],
                 hide_index=True)
    show(comparison_figure([{"method": r.method, "ppl": r.ppl} for r in cmp.rows if r.method not in BASELINES
                            or r.method == "reverse"], dense_ppl=cmp.dense.ppl,
                           title=f"Held-out perplexity after removing {n_remove} blocks, by criterion"), key="crit_fig")


def _healing_section() -> None:
    st.subheader("Healing curve")
    st.caption("`residscope heal --model PRUNED --out DIR` fine-tunes a pruned model, and `residscope heal --model "
               "DENSE --method streamline --remove N --out DIR` replaces the most redundant N + 1 consecutive blocks "
               "by one trained block (LLM-Streamline); both record held-out perplexity along the way: open the "
               "residscope_healing.json (or the folder) here.")
    path = st.text_input("Healing result (JSON file or healed folder)", key="heal_path", placeholder="out/healed")
    if not path.strip():
        return
    try:
        result = cache.healing_curve(path)
    except InputError as e:
        st.error(str(e))
        return
    steps = [p["step"] for p in result["curve"]]
    fig = go.Figure(go.Scatter(x=steps, y=[p["ppl"] for p in result["curve"]], mode="lines+markers",
                               name="held-out perplexity"))
    fig.update_layout(title=f"Healing by {result.get('method')}: {result['before']:.3f} → {result['after']:.3f}",
                      xaxis_title="optimizer step", yaxis_title="held-out perplexity", template="plotly_white")
    show(fig, key="heal_curve")
    span = result.get("streamline")
    if span:
        first, removed = span.get("start_original", span["start"]), span.get("removed_original", span["removed"])
        st.markdown(f"LLM-Streamline replaced blocks {first}-{removed[-1]} (angular distance "
                    f"{span['span_distance']:.4f} between the streams entering and leaving them) by block {first}, "
                    f"trained alone: {span.get('loss', 'mse')} stream error {span['mse_before']:.4g} → "
                    f"{span['mse_after']:.4g}; removed {removed}.")
    if result.get("note"):
        st.info(result["note"])


# ---- 6. context extension -----------------------------------------------------------------------------------------
def _lengths(text: str, what: str) -> tuple[int, ...]:
    return tuple(parse_lengths(text, what))


def _depths(text: str) -> tuple[float, ...]:
    return tuple(parse_fractions(text, "depths"))


def page_extension(source: str) -> None:
    from residscope.analyses.extension_plots import passkey_figure, perplexity_figure

    st.header("Context-window extension")
    zoo = [r for r in cache.model_rows() if r["alias"].startswith("zoo-")]
    built = [r["alias"] for r in zoo if r["installed"]]
    if built:
        st.caption(f"Zoo models on this machine (pick one in the sidebar): {', '.join(built)}.")
    else:
        st.caption("No zoo model is built on this machine; the page runs on the model picked in the sidebar.")
    c1, c2, c3 = st.columns(3)
    override = int(c1.number_input("Trained window W (0 = the config's)", 0, 1 << 20, 0, key="ext_window"))
    window = override or None
    w = cache.trained_window(source, window)
    factor_in = float(c2.number_input("Factor s (0 = longest length / W)", 0.0, 1024.0, 0.0, key="ext_factor"))
    factor = factor_in if factor_in >= 1 else None
    max_tokens = int(c3.number_input("Evaluation tokens read", 256, 1 << 20, 2048, step=256, key="ext_max_tokens"))
    methods_all = cache.extension_methods(source)
    st.caption(f"Trained window W = {w:,} tokens. Methods that apply to this model: {', '.join(methods_all)}.")
    limit = position_limit(source)
    default_lengths = f"{w},{2 * w},{4 * w}" if w <= 512 else "128,256,512"
    if limit is not None:
        st.info(f"This model's positions are a learned table of {limit}: nothing runs past position {limit}, so "
                "lengths stay within it.")
        default_lengths = ",".join(str(n) for n in sorted({max(8, limit // 4), max(8, limit // 2), limit}))
    elif w > 512:
        st.info(f"W = {w:,} is long for a CPU: the default lengths stay inside it. Set W smaller to study "
                "extension on this model, or pick a zoo model.")
    methods = st.multiselect("Methods", methods_all, default=[m for m in methods_all if m != "pv-replace"],
                             key=f"ext_methods_{source}")

    st.subheader("Perplexity against length")
    lengths_text = st.text_input("Lengths", default_lengths, key=f"ext_lengths_{w}")
    if st.button("Run perplexity", key="ext_ppl_button", disabled=not methods):
        st.session_state["ext_ppl"] = (tuple(methods), _lengths(lengths_text, "lengths"), factor, window, max_tokens)
    if st.session_state.get("ext_ppl"):
        methods_, lengths_, factor_, window_, max_tokens_ = st.session_state["ext_ppl"]
        rows = []
        bar = st.progress(0.0, text="sliding-window perplexity")
        for i, method in enumerate(methods_):
            bar.progress(i / len(methods_), text=f"{method}: sliding-window perplexity at {', '.join(map(str, lengths_))}")
            rows += cache.extension_perplexity(source, method, lengths_, factor_, window_, max_tokens_)
        bar.progress(1.0, text="done")
        best = min(rows, key=lambda r: (-r.length, r.ppl))
        st.metric(f"Best at {best.length:,} tokens", f"{best.method}: {best.ppl:.3f}")
        show(perplexity_figure(rows, window=cache.trained_window(source, window_)), key="ext_ppl_fig")
        st.dataframe([{"method": r.method, "length": r.length, "factor": r.factor, "perplexity": round(r.ppl, 4),
                       "tokens": r.n_tokens, "windows": r.n_windows} for r in rows], hide_index=True)

    st.subheader("Passkey retrieval")
    c1, c2, c3 = st.columns(3)
    pk_lengths = c1.text_input("Prompt lengths", str(min(max(w, 256), 512, limit or 512)), key=f"pk_lengths_{w}")
    pk_depths = c2.text_input("Key depths", "0.5", key="pk_depths")
    n_keys = int(c3.number_input("Keys per cell", 1, 20, 3, key="pk_keys"))
    if st.button("Run passkey", key="pk_button", disabled=not methods):
        st.session_state["pk"] = (tuple(methods), _lengths(pk_lengths, "prompt lengths"), _depths(pk_depths),
                                  n_keys, factor, window)
    if st.session_state.get("pk"):
        methods_, lengths_, depths_, keys_, factor_, window_ = st.session_state["pk"]
        rows = []
        bar = st.progress(0.0, text="passkey")
        for i, method in enumerate(methods_):
            bar.progress(i / len(methods_), text=f"{method}: passkey at {', '.join(map(str, lengths_))}")
            rows += cache.passkey(source, method, lengths_, depths_, keys_, factor_, window_)
        bar.progress(1.0, text="done")
        st.metric("Mean accuracy", f"{np.mean([r.accuracy for r in rows]):.2f}")
        show(passkey_figure(rows), key="pk_fig")
        st.dataframe([{"method": r.method, "length": r.length, "depth": r.depth, "accuracy": r.accuracy,
                       "prompt tokens": r.prompt_tokens, "answers": " ".join(r.answers)} for r in rows], hide_index=True)


# ---- 7. long-context tasks (RULER) ----------------------------------------------------------------------------------
def page_ruler(source: str) -> None:
    from residscope.analyses.ruler_plots import ruler_figure
    from residscope.analyses.ruler_tasks import TASKS

    st.header("Long-context tasks (RULER)")
    st.caption("RULER's synthetic tasks that need no downloaded data: needles in a haystack (noise, the built-in "
               "evaluation split, or other needles), variable tracking, common- and frequent-words extraction. Greedy "
               "decoding; score = RULER's string_match_all (percent of the reference strings found in the answer).")
    w = cache.trained_window(source)
    tasks = st.multiselect("Tasks", list(TASKS), default=["niah_single_1"], key="ruler_tasks")
    c1, c2, c3, c4 = st.columns(4)
    limit = position_limit(source)
    lengths_text = c1.text_input("Lengths (prompt + answer budget)", str(min(1024, limit or 1024)), key="ruler_lengths")
    depths_text = c2.text_input("Needle depths", "0.5", key="ruler_depths")
    samples = int(c3.number_input("Samples per cell", 1, 50, 1, key="ruler_samples"))
    seed = int(c4.number_input("Seed", 0, 1 << 30, 42, key="ruler_seed"))
    c1, c2 = st.columns(2)
    methods = cache.extension_methods(source)
    method = c1.selectbox("Extension method", methods, key=f"ruler_method_{source}")
    factor_in = float(c2.number_input("Factor s (0 = longest length / W)", 0.0, 1024.0, 0.0, key="ruler_factor"))
    st.caption(f"Trained window W = {w:,} tokens; every sample decodes up to 128 tokens (niah), 120 (cwe), 50 (fwe) or "
               "30 (vt): a few seconds per sample per thousand tokens on a CPU.")
    if limit is not None:
        st.info(f"This model's positions are a learned table of {limit}: a prompt and its answer must fit in it.")
    if tasks:
        with st.expander(f"Sample prompt of {tasks[0]}"):
            lengths_ = _lengths(lengths_text, "lengths")
            try:
                p = cache.ruler_prompt(source, tasks[0], lengths_[0], _depths(depths_text)[0], seed)
            except InputError as e:  # the length is too short for the task: the preview says so, the run would too
                st.warning(str(e))
            else:
                st.caption(f"{len(p.ids):,} tokens + {p.max_new_tokens} to generate; references: "
                           f"{', '.join(p.references)}")
                st.text(p.text if len(p.text) < 6000 else p.text[:3000] + "\n[...]\n" + p.text[-3000:])
    if st.button("Run RULER", key="ruler_button", disabled=not tasks):
        st.session_state["ruler"] = (tuple(tasks), _lengths(lengths_text, "lengths"), _depths(depths_text), samples, seed,
                                     method, factor_in if factor_in >= 1 else None)
    if st.session_state.get("ruler"):
        tasks_, lengths_, depths_, samples_, seed_, method_, factor_ = st.session_state["ruler"]
        with computing(f"RULER: {len(tasks_)} tasks at {', '.join(map(str, lengths_))} tokens ({method_})"):
            result = cache.ruler(source, tasks_, lengths_, depths_, samples_, seed_, method_, factor_, None)
        by_length = result.length_scores()
        longest = max(by_length)
        st.metric(f"Average score at {longest:,} tokens", f"{by_length[longest]:.1f}")
        show(ruler_figure(result, title=source), key="ruler_fig")
        st.dataframe([{"task": c.task, "length": c.length, "depth": c.depth, "score": c.score,
                       "prompt tokens": " ".join(map(str, c.prompt_tokens)),
                       "references": " | ".join(", ".join(r) for r in c.references),
                       "predictions": " | ".join(c.predictions)} for c in result.cells], hide_index=True)
# ---- 7. mixture of experts ----------------------------------------------------------------------------------------
def page_experts(source: str) -> None:
    from residscope.analyses import experts_plots

    st.header("Mixture of experts: routing, attribution and expert pruning")
    layers = cache.moe_layers(source)
    if not layers:
        st.info("This model has no mixture-of-experts layers (try zoo-moe, or a Qwen2-MoE / Qwen3-MoE / Mixtral / OLMoE "
                "checkpoint).")
        return
    lm = cache.model(source)
    c1, c2 = st.columns(2)
    samples = int(c1.number_input("Calibration samples", 1, 256, 8, key="moe_samples"))
    seq_len = tokens_per_sample(c2, source, "moe_seq_len")
    with computing(f"Routing {samples} x {seq_len} tokens through {len(layers)} MoE layers..."):
        stats, attr = cache.routing(source, samples, seq_len)
    m1, m2, m3 = st.columns(3)
    m1.metric("Experts", f"{stats.top_k} of {stats.n_experts} per token")
    m2.metric("Mean load imbalance", f"{float(stats.imbalance.mean()):.3f}")
    m3.metric("Mean router entropy", f"{float(stats.entropy.mean()):.3f} nats")
    show(experts_plots.load_heatmap(stats), key="moe_load")
    show(experts_plots.routing_summary(stats), key="moe_summary")
    row = st.selectbox("Layer", list(range(len(stats.layers))), format_func=lambda r: str(stats.layers[r]),
                       key="moe_layer")
    show(experts_plots.position_heatmap(stats, row), key="moe_position")
    st.subheader("Top tokens per expert")
    st.dataframe({"expert": list(range(stats.n_experts)), "load": [round(float(x), 4) for x in stats.load[row]],
                  "top tokens": [", ".join(f"{cache.token_label(lm.tokenizer, t)} {s:.0%}" for t, s in toks[:6])
                                 for toks in stats.top_tokens[row]]}, hide_index=True)
    show(experts_plots.attribution_heatmap(attr), key="moe_attribution")

    st.subheader("Expert pruning")
    c1, c2, c3 = st.columns(3)
    criterion = c1.selectbox("Criterion", ("reap", "frequency", "weight", "reconstruction"), key="moe_criterion")
    keep = int(c2.number_input("Experts kept per layer", stats.top_k, stats.n_experts, max(stats.top_k, stats.n_experts // 2),
                               key="moe_keep"))
    eval_samples = int(c3.number_input("Held-out samples", 1, 256, 8, key="moe_eval_samples"))
    if st.button("Prune experts and measure", key="moe_prune"):
        with computing(f"Keeping {keep} experts per layer by {criterion} and measuring perplexity..."):
            dense = cache.expert_pruned_ppl(source, criterion, 0, samples, seq_len, eval_samples)
            pruned = cache.expert_pruned_ppl(source, criterion, keep, samples, seq_len, eval_samples)
        p1, p2 = st.columns(2)
        p1.metric("Held-out perplexity, all experts", f"{dense.ppl:.3f}")
        p2.metric(f"Held-out perplexity, {keep} kept", f"{pruned.ppl:.3f}", f"{pruned.ppl - dense.ppl:+.3f}",
                  delta_color="inverse")


PAGES = {
    "tokens": ("Prompt & logit lens", page_tokens),
    "attention": ("Attention & sinks", page_attention),
    "residual": ("Residual & positional vectors", page_residual),
    "rope": ("RoPE bound", page_rope),
    "pruning": ("Block Influence & pruning", page_pruning),
    "extension": ("Context extension", page_extension),
    "ruler": ("Long-context tasks (RULER)", page_ruler),
    "experts": ("Mixture of experts", page_experts),
}
