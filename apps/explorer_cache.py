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


@st.cache_data(max_entries=4, show_spinner=False)
def long_context(source: str, seq_len: int, samples: int, text: str, first_k: int, method: str):
    """LongContextStatistics on long-document chunks (default the plays' evaluation split), with an extension method."""
    from residscope.analyses.extension import apply_method, extension_settings
    from residscope.analyses.long_context import long_context_batches, long_context_statistics

    lm = model(source)
    batches, description = long_context_batches(lm, seq_len, samples, text=text)
    f, kw = extension_settings(lm, method, [seq_len]) if method != "none" else (1.0, {})
    with model_lock(source), apply_method(lm, method, f, **kw):
        return long_context_statistics(lm, batches, first_k=first_k, source=description, progress=False)


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


@st.cache_data(max_entries=4, show_spinner=False)
def compare_criteria(source: str, criteria: tuple[str, ...], n_remove: int, samples: int, seq_len: int,
                     eval_samples: int):
    """`compare_removals` over `criteria` on the first `samples` calibration chunks, their stability on the next
    `samples` (a disjoint slice), held-out perplexity on the evaluation split (what `prune --compare` prints)."""
    from residscope.analyses.corpus import calibration_batches
    from residscope.surgery.compare import compare_removals

    lm = model(source)
    both, description = calibration_batches(lm, seq_len=seq_len, samples=2 * samples, batch_size=4)
    chunks = torch.cat(both)  # [2 * samples, seq_len]
    evals, eval_source = calibration_batches(lm, seq_len=seq_len, samples=eval_samples, batch_size=4, split="evaluation")
    with model_lock(source):
        return compare_removals(lm, n_remove, evals, calibration_batches=list(chunks[:samples].split(4)),
                                stability_batches=list(chunks[samples:].split(4)), methods=criteria, seeds=1,
                                eval_source=eval_source, calibration_source=f"{description}, first half",
                                stability_source=f"{description}, second half")


def healing_curve(path: str) -> dict:
    """A `residscope heal` result (its --curve-json, or residscope_healing.json in the healed folder)."""
    import json
    from pathlib import Path

    file = Path(path.strip()).expanduser()
    if file.is_dir():
        file = file / "residscope_healing.json"
    if not file.is_file():
        raise InputError(f"{file}: no such file (a --curve-json file or a healed checkpoint folder)")
    try:
        result = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f"{file}: not JSON ({e})") from None
    if not isinstance(result, dict) or not isinstance(result.get("curve"), list):
        raise InputError(f"{file}: no healing curve in it (expected the JSON `residscope heal` writes)")
    return result


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


@st.cache_data(max_entries=8, show_spinner=False)
def evaluation(source: str, removed: tuple[int, ...], tasks: tuple[str, ...], n: int):
    """`evaluate_model` on the dense or pruned model (same seed, so both see the same items)."""
    from residscope.analyses.evaluation import evaluate_model

    lm = pruned_model(source, removed) if removed else model(source)
    with model_lock(source):
        return evaluate_model(lm, tasks, n=n, seed=0, name="pruned" if removed else "dense")


@st.cache_data(max_entries=8, show_spinner=False)
def cut(source: str, removed: tuple[int, ...], samples: int, seq_len: int):
    from residscope.surgery.cut_lens import cut_comparison

    with model_lock(source):
        return cut_comparison(model(source), pruned_model(source, removed), seq_len=seq_len, samples=samples)


def export_gguf(source: str, removed: tuple[int, ...], path: str, quant: str):
    """Write the (pruned) model as GGUF; refuses an existing file (no --force from the app)."""
    from residscope.model.gguf_export import write_gguf

    if not path.strip():
        raise InputError("GGUF file: enter a path")
    lm = pruned_model(source, removed) if removed else model(source)
    with model_lock(source):
        return write_gguf(lm, path.strip(), quant=quant)


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


@st.cache_data(max_entries=16, show_spinner=False)
def ruler(source: str, tasks: tuple[str, ...], lengths: tuple[int, ...], depths: tuple[float, ...], samples: int, seed: int,
          method: str, factor: float | None, window: int | None):
    from residscope.analyses.extension import method_options
    from residscope.analyses.ruler import ruler_study

    with model_lock(source):
        return ruler_study(model(source), list(tasks), list(lengths), list(depths), samples=samples, seed=seed,
                           method=method, factor=factor, window=window, method_kw=method_options(method, window=window),
                           progress=False)


@st.cache_data(max_entries=16, show_spinner=False)
def ruler_prompt(source: str, task: str, length: int, depth: float, seed: int):
    """Sample 0 of `task` at `length` (depth ignored by cwe and fwe): what the model reads, and the references."""
    from residscope.analyses.ruler import essay_haystack
    from residscope.analyses.ruler_tasks import TASKS, build_prompt

    essay = essay_haystack() if TASKS[task].uses_essay else None
    return build_prompt(model(source).tokenizer, task, length, depth, 0, seed=seed, essay=essay)
