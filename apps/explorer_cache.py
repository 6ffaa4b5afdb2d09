"""Cached calls into the library for the Streamlit explorer (`explorer_app.py`).

Models are `st.cache_resource` (one copy shared by every session, a lock around the forward passes that change run-time
settings); results are `st.cache_data`, keyed by the model source and the page's settings. Functions here only call
the public API of `residscope.model`, `analyses` and `surgery` and reshape their results for display; the analyses
themselves live in the library.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
import streamlit as st
import torch

from residscope.model.errors import InputError

ENV_MODEL = "RESIDSCOPE_EXPLORER_MODEL"  # default model of the explorer (alias, folder or .gguf); `residscope app --model`


def default_model() -> str:
    from residscope.model.registry import DEFAULT_MODEL

    return os.environ.get(ENV_MODEL) or DEFAULT_MODEL


@st.cache_resource(max_entries=2, show_spinner=False)
def model(source: str):
    from residscope.model import load_model

    return load_model(source)


@st.cache_resource(show_spinner=False)
def model_lock(source: str) -> threading.RLock:
    """Serialises forward passes on one shared model: extension methods change its positional settings while they run."""
    return threading.RLock()


@st.cache_resource(max_entries=1, show_spinner=False)
def pruned_model(source: str, layers: tuple[int, ...]):
    from residscope.surgery.removal import remove_layers

    return remove_layers(model(source), list(layers))


@st.cache_data(ttl=60, show_spinner=False)
def model_rows() -> list[dict]:
    from residscope.model.registry import list_models

    return [dict(alias=r.alias, installed=r.installed, description=r.description, install=r.install, default=r.default)
            for r in list_models()]


def token_label(tokenizer, token_id: int) -> str:
    """A token as text with visible spaces and newlines."""
    text = tokenizer.decode([int(token_id)])
    return text.replace(" ", "␣").replace("\n", "⏎") or f"<{token_id}>"


# ---- page 1: prompt, next-token predictions, logit lens ----------------------------------------------------------
@dataclass
class PromptRun:
    token_ids: list[int]
    tokens: list[str]
    top_tokens: list[str]  # next-token candidates after the last position, most likely first
    top_probs: list[float]
    top_logits: list[float]
    lens_tokens: list[list[str]]  # [layer, pos] top-1 token of the logit lens
    lens_probs: np.ndarray  # [layer, pos] its probability
    lens_target_probs: np.ndarray  # [layer, pos] probability of the model's final top-1 token at that position
    continuation: str


@st.cache_data(max_entries=16, show_spinner=False)
def prompt_run(source: str, prompt: str, top_k: int = 10, new_tokens: int = 12) -> PromptRun:
    """Tokens, the final next-token distribution, the logit lens (final norm + unembedding of every
    `blocks.{i}.hook_resid_post`) and a greedy continuation."""
    from residscope.analyses.logit_lens import logit_lens

    lm = model(source)
    if not prompt.strip():
        raise InputError("prompt: enter some text")
    ids = lm.to_tokens(prompt)  # [1, pos]
    with model_lock(source), torch.inference_mode():
        lens = logit_lens(lm, ids)
        out = lm.generate(ids, max_new_tokens=new_tokens) if new_tokens else ids
    probs = lens.logits[-1].softmax(-1)  # [vocab]
    top = probs.topk(min(top_k, probs.numel()))
    tok = lm.tokenizer
    return PromptRun(
        token_ids=ids[0].tolist(),
        tokens=[token_label(tok, i) for i in ids[0].tolist()],
        top_tokens=[token_label(tok, i) for i in top.indices.tolist()],
        top_probs=top.values.tolist(),
        top_logits=lens.logits[-1, top.indices].tolist(),
        lens_tokens=[[token_label(tok, i) for i in row] for row in lens.top_ids.tolist()],
        lens_probs=lens.top_probs.numpy(),
        lens_target_probs=lens.target_probs.numpy(),
        continuation=lm.to_string(out[0, ids.shape[1]:]),
    )


# ---- page 2: attention ------------------------------------------------------------------------------------------
@st.cache_data(max_entries=8, show_spinner=False)
def prompt_attention(source: str, prompt: str, first_k: int = 1):
    """(tokens, patterns [layer, head, q, k], AttentionStatistics of the prompt)."""
    from residscope.analyses.positional import attention_statistics

    lm = model(source)
    if not prompt.strip():
        raise InputError("prompt: enter some text")
    ids = lm.to_tokens(prompt)  # [1, pos]
    layers = lm.attention_layers()
    names = [f"blocks.{i}.attn.hook_pattern" for i in layers]
    with model_lock(source), torch.inference_mode():
        _, cache = lm.run_with_cache(ids, names_filter=lambda name: name in names)
        patterns = torch.stack([cache[n][0] for n in names]).float().numpy()  # [layer, head, q_pos, k_pos]
        stats = attention_statistics(lm, [ids], first_k=min(first_k, ids.shape[1] - 1) or 1, progress=False)
    return [token_label(lm.tokenizer, i) for i in ids[0].tolist()], patterns, layers, stats


@st.cache_data(max_entries=8, show_spinner=False)
def corpus_attention(source: str, samples: int, seq_len: int, first_k: int):
    from residscope.analyses.corpus import calibration_batches
    from residscope.analyses.positional import attention_statistics

    lm = model(source)
    batches, description = calibration_batches(lm, seq_len=seq_len, samples=samples, batch_size=4)
    with model_lock(source):
        return attention_statistics(lm, batches, first_k=first_k, progress=False), description


# ---- page 3: residual norms and positional vectors ---------------------------------------------------------------
@st.cache_data(max_entries=8, show_spinner=False)
def positional(source: str, samples: int, seq_len: int, first_k: int, cos_threshold: float):
    """(PositionalDecomposition, PositionalDescription, corpus description) on calibration chunks."""
    from residscope.analyses.corpus import calibration_batches
    from residscope.analyses.positional import decompose_positions, describe_positions

    lm = model(source)
    batches, description = calibration_batches(lm, seq_len=seq_len, samples=samples, batch_size=4)
    with model_lock(source):
        dec = decompose_positions(lm, batches, progress=False)
    return dec, describe_positions(dec, first_k=min(first_k, seq_len), cos_threshold=cos_threshold), description


# ---- page 4: RoPE bound -----------------------------------------------------------------------------------------
@st.cache_data(max_entries=64, show_spinner=False)
def rope_curve(base: float, head_dim: int, method: str, factor: float, window: int, max_m: int):
    """(context bound, B(m) at log-spaced m, the m values) of the frequencies of one RoPE setting.

    `method` is an extension method's name ("none", "pi", "ntk", "dynamic-ntk", "yarn"), mapped to RoPE parameters by
    the library (`rope_setting`)."""
    from residscope.analyses.extension import rope_setting
    from residscope.analyses.rope_bound import context_bound, rope_frequencies, rope_sum
    from residscope.model import RopeParams

    params = rope_setting(RopeParams(theta=base), method, factor, window, head_dim)
    seq_len = int(window * factor) if method == "dynamic-ntk" else None
    inv_freq = rope_frequencies(params, head_dim, seq_len=seq_len)  # [head_dim // 2]
    m = torch.unique(torch.logspace(0, float(np.log10(max_m)), 2000).round().long())  # [P]
    return context_bound(inv_freq=inv_freq), m.numpy(), rope_sum(m, inv_freq=inv_freq).numpy(), params.theta


@st.cache_data(max_entries=32, show_spinner=False)
def base_lower_bound(length: int, head_dim: int):
    from residscope.analyses.rope_bound import base_lower_bound as lower_bound

    return lower_bound(length, head_dim)


@st.cache_data(max_entries=4, show_spinner=False)
def paper_table(head_dim: int, lengths: tuple[int, ...]):
    from residscope.analyses.rope_bound import paper_table as table

    return table(head_dim, lengths=list(lengths))


@st.cache_data(max_entries=8, show_spinner=False)
def model_bounds(source: str):
    from residscope.analyses.rope_bound import model_bounds as bounds

    cfg = model(source).cfg
    if cfg.positional != "rope":
        return None
    return bounds(cfg)


# ---- page 5: Block Influence and pruning ------------------------------------------------------------------------
@st.cache_data(max_entries=8, show_spinner=False)
def influence(source: str, metric: str, samples: int, seq_len: int):
    from residscope.analyses.corpus import calibration_batches
    from residscope.surgery.influence import block_influence_result

    lm = model(source)
    batches, description = calibration_batches(lm, seq_len=seq_len, samples=samples, batch_size=4)
    with model_lock(source):
        return block_influence_result(lm, batches, metric, progress=False, source=description)


@st.cache_data(max_entries=16, show_spinner=False)
def heldout_ppl(source: str, removed: tuple[int, ...], samples: int, seq_len: int):
    from residscope.analyses.perplexity import heldout_perplexity

    lm = pruned_model(source, removed) if removed else model(source)
    with model_lock(source), torch.inference_mode():
        return heldout_perplexity(lm, seq_len=seq_len, samples=samples, progress=False)


@st.cache_data(max_entries=16, show_spinner=False)
def generation(source: str, removed: tuple[int, ...], prompt: str, new_tokens: int) -> str:
    lm = pruned_model(source, removed) if removed else model(source)
    ids = lm.to_tokens(prompt)
    with model_lock(source), torch.inference_mode():
        return lm.to_string(lm.generate(ids, max_new_tokens=new_tokens)[0, ids.shape[1]:])


def export_pruned(source: str, removed: tuple[int, ...], folder: str, influence_result=None, perplexity=None):
    """Write the pruned model as a transformers checkpoint; refuses a non-empty folder (save_pretrained's check)."""
    from residscope.surgery.export import pruning_record, save_pretrained

    if not folder.strip():
        raise InputError("export folder: enter a folder name")
    lm = pruned_model(source, removed)
    record = pruning_record(removed_layers=list(removed), n_layers_before=model(source).cfg.n_layers,
                            influence=influence_result, perplexity=perplexity)
    with model_lock(source):
        return save_pretrained(lm, folder, pruning_info=record, force=False)


# ---- page 7: mixture of experts ---------------------------------------------------------------------------------
def moe_layers(source: str) -> list[int]:
    from residscope.model.moe import moe_layers as layers

    return layers(model(source))


@st.cache_data(max_entries=8, show_spinner=False)
def routing(source: str, samples: int, seq_len: int):
    from residscope.analyses.corpus import calibration_batches
    from residscope.analyses.experts import expert_attribution, routing_statistics

    lm = model(source)
    batches, description = calibration_batches(lm, seq_len=seq_len, samples=samples, batch_size=4)
    with model_lock(source):
        return (routing_statistics(lm, batches, progress=False, source=description),
                expert_attribution(lm, batches, progress=False))


@st.cache_resource(max_entries=1, show_spinner=False)
def expert_pruned_model(source: str, criterion: str, keep: int, samples: int, seq_len: int):
    from residscope.analyses.corpus import calibration_batches
    from residscope.surgery.experts import choose_experts, prune_experts

    lm = model(source)
    batches, _ = calibration_batches(lm, seq_len=seq_len, samples=samples, batch_size=4)
    with model_lock(source):
        choice = choose_experts(lm, batches, keep, criterion, progress=False)
        return prune_experts(lm, choice.keep), choice


@st.cache_data(max_entries=16, show_spinner=False)
def expert_pruned_ppl(source: str, criterion: str, keep: int, samples: int, seq_len: int, eval_samples: int):
    from residscope.analyses.perplexity import heldout_perplexity

    lm = expert_pruned_model(source, criterion, keep, samples, seq_len)[0] if keep else model(source)
    with model_lock(source), torch.inference_mode():
        return heldout_perplexity(lm, seq_len=seq_len, samples=eval_samples, progress=False)


# ---- page 6: context extension ----------------------------------------------------------------------------------
def extension_methods(source: str) -> list[str]:
    from residscope.analyses.extension import applicable_methods

    return applicable_methods(model(source))


def trained_window(source: str, window: int | None = None) -> int:
    from residscope.analyses.extension import trained_window as window_of

    return window_of(model(source), window)


PV_SAMPLES = 16  # calibration chunks for the positional vectors of pv-replace (the library's default, 512, is slow here)


def _method_kw(method: str, window: int | None) -> dict[str, dict]:
    from residscope.analyses.extension import method_options

    return {method: method_options(method, window=window, samples=PV_SAMPLES if method == "pv-replace" else None)}


@st.cache_data(max_entries=32, show_spinner=False)
def extension_perplexity(source: str, method: str, lengths: tuple[int, ...], factor: float | None, window: int | None,
                         max_tokens: int):
    from residscope.analyses.extension import extension_perplexity as run

    with model_lock(source):
        return run(model(source), [method], list(lengths), factor=factor, window=window, max_tokens=max_tokens,
                   progress=False, method_kw=_method_kw(method, window))


@st.cache_data(max_entries=32, show_spinner=False)
def passkey(source: str, method: str, lengths: tuple[int, ...], depths: tuple[float, ...], n_keys: int,
            factor: float | None, window: int | None):
    from residscope.analyses.extension import passkey_study

    with model_lock(source):
        return passkey_study(model(source), [method], list(lengths), list(depths), n_keys=n_keys, factor=factor,
                             window=window, method_kw=_method_kw(method, window), progress=False)
