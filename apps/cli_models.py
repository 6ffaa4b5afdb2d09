"""`residscope models` (the aliases and where they come from) and `residscope generate` (a continuation from any model)."""

from __future__ import annotations

import json
import logging
from typing import Optional

import typer

from residscope.model.errors import InputError

from .cli_common import DEVICE, DTYPE, MODEL, load, model_name



def _show_progress() -> None:
    """One-off work (assembling, converting a GGUF) is logged by residscope at INFO: show it on stderr."""
    logger = logging.getLogger("residscope")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("residscope: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def models(as_json: bool = typer.Option(False, "--json", help="print the rows as JSON")) -> None:
    """List the model aliases: architecture, where each comes from, whether it is installed and how to install it."""
    from dataclasses import asdict

    from residscope.model.registry import list_models

    rows = list_models()
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in rows], indent=1))
        return
    width = max(len(r.alias) for r in rows) + 2  # room for the default marker
    for r in rows:
        alias = r.alias + (" *" if r.default else "")
        state = "installed" if r.installed else "missing"
        typer.echo(f"{alias:<{width}}  {r.architecture:<12}  {state:<9}  {r.origin}")
        if not r.installed:
            typer.echo(f"{'':<{width}}  {'':<12}  {'':<9}  -> {r.install}")
    typer.echo("* default model. Also accepted wherever a model is asked for: a Hugging Face folder or a .gguf file.")


def generate(
    prompt: str = typer.Argument(..., help="text to continue"),
    model: Optional[str] = MODEL,
    max_new_tokens: int = typer.Option(20, "--max-new-tokens",
                                       help="tokens to generate (at most 4096: minutes on a CPU)"),
    sample: bool = typer.Option(False, "--sample", help="sample instead of greedy decoding"),
    temperature: float = typer.Option(1.0, "--temperature", help="softmax temperature when sampling (> 0)"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="sample among the k most likely tokens"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="nucleus sampling mass in (0, 1]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of the sampler (reproducible samples)"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the model's chat template as a user turn"),
    dtype: str = DTYPE,
    device: str = DEVICE,
) -> None:
    """Print the model's continuation of PROMPT (greedy unless --sample)."""
    if sample and not temperature > 0:
        raise InputError(f"--temperature must be > 0 when sampling, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1], got {top_p}")
    if not sample and (top_k is not None or top_p is not None or seed is not None):
        raise InputError("--top-k, --top-p and --seed only apply with --sample")
    _show_progress()

    import torch

    model = model_name(model)
    lm = load(model, device, dtype)
    tok = lm.tokenizer
    if tok is None:
        raise InputError(f"{model}: this checkpoint has no tokenizer files, so it cannot take a text prompt")
    if chat:
        if not getattr(tok, "chat_template", None):
            raise InputError(f"{model}: --chat needs a chat template, and this tokenizer has none")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    ids = ids.to(lm.device)  # [1, pos]
    generator = None
    if sample and seed is not None:
        generator = torch.Generator(device=lm.device).manual_seed(seed)
    out = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k,
                      top_p=top_p, generator=generator, verbose=True)  # [1, pos + new]; progress bar on stderr
    typer.echo(tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True))


def register(app: typer.Typer) -> None:
    app.command("models")(models)
    app.command("generate")(generate)
