"""Healing a pruned model: a short fine-tune on calibration text that recovers part of what the removal cost.

Two recipes from the pruning papers:

    partial   "Reassessing Layer Pruning" (Lu et al. 2024): train only the last `last_k` blocks and `lm_head`; they
              find this beats LoRA and makes even the reverse-order baseline strong. With tied embeddings (SmolLM2)
              `lm_head` *is* the input embedding, so training it changes both (the checkpoint stays tied).
    lora      LoRA adapters (`peft`) on the named linear layers of every block (Gromov et al. 2024 heal with LoRA on
              the MLPs: gate_proj, up_proj, down_proj), merged into the weights at the end, so the result is a plain
              model again.

The loop: AdamW on the trainable parameters, linear warm-up then linear decay of the learning rate, `grad_accum`
micro-batches per optimizer step (loss = mean next-token NLL over each step's tokens), a tqdm bar, and the held-out
perplexity (evaluation split) before training, every `eval_every` steps and at the end: `HealResult.curve`.
Deterministic for a given `seed` (data order and LoRA initialisation) on the same machine and thread count.

The model is trained in place (float32 recommended) and stays a residscope Decoder; save it with `save_pretrained`.
It must be in memory: healing an offloaded model is refused (its blocks live on disk).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from residscope.analyses.perplexity import perplexity
from residscope.common.batches import Batch, unpack_batch
from residscope.model.errors import InputError

METHODS = ("partial", "lora")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", *MLP_MODULES)


@dataclass
class HealResult:
    method: str
    trained: list[str]  # parameter names (partial) or adapted module names (lora)
    trainable_params: int
    steps: int
    grad_accum: int
    lr: float
    seed: int
    train_tokens: int  # tokens seen by the optimizer (predicted tokens, all steps)
    curve: list[dict]  # {"step", "train_loss" (mean of the last steps), "ppl"} at each evaluation
    before: float  # held-out perplexity before healing
    after: float  # after
    seconds: float
    note: str | None = None  # e.g. that the model had nothing removed
    eval_source: str | None = None
    train_source: str | None = None
    losses: list[float] = field(default_factory=list)  # training loss per optimizer step
    streamline: dict | None = None  # method "streamline": the replaced span and the MSE before / after (streamline.py)

    def recovered(self, dense_ppl: float) -> float | None:
        """Share of the perplexity gap to the dense model closed by healing, in log-perplexity (NLL) terms:
        (nll_before - nll_after) / (nll_before - nll_dense); None when there is no gap."""
        gap = math.log(self.before) - math.log(dense_ppl)
        return (math.log(self.before) - math.log(self.after)) / gap if gap > 0 else None

    def to_dict(self) -> dict:
        return asdict(self)


def check_heal_options(method: str, *, last_k: int | None = None, n_layers: int | None = None,
                       lora_modules: Sequence[str] = MLP_MODULES, steps: int = 1, grad_accum: int = 1,
                       lr: float = 1e-4, lora_rank: int = 8) -> None:
    if method not in (*METHODS, "streamline"):
        raise InputError(f"--method must be one of {', '.join(METHODS)} or streamline; got {method!r}")
    if steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}")
    if grad_accum < 1:
        raise InputError(f"--grad-accum must be >= 1, got {grad_accum}")
    if not lr > 0:
        raise InputError(f"--lr must be > 0, got {lr}")
    if method == "partial" and last_k is not None and n_layers is not None and not 0 <= last_k <= n_layers:
        raise InputError(f"--last-k must be between 0 and {n_layers} (the model's layers); got {last_k}")
    if method == "lora":
        unknown = [m for m in lora_modules if m not in LINEAR_MODULES]
        if unknown or not lora_modules:
            raise InputError(f"--lora-modules: choose from {', '.join(LINEAR_MODULES)}; got {list(lora_modules)}")
        if lora_rank < 1:
            raise InputError(f"--lora-rank must be >= 1, got {lora_rank}")


def heal(model, train_batches: Sequence[Batch], eval_batches: Sequence[Batch], *, method: str = "partial",
         last_k: int = 4, lora_modules: Sequence[str] = MLP_MODULES, lora_rank: int = 8, lora_alpha: float = 16.0,
         steps: int = 100, grad_accum: int = 1, lr: float = 1e-4, weight_decay: float = 0.0, warmup: int | None = None,
         eval_every: int | None = None, seed: int = 0, nothing_removed: bool = False, progress: bool = True,
         eval_source: str | None = None, train_source: str | None = None) -> HealResult:
    """Fine-tune `model` in place on `train_batches` (micro-batches of token ids, cycled in a seeded order) for `steps`
    optimizer steps of `grad_accum` micro-batches each; held-out perplexity on `eval_batches` along the way."""
    from tqdm.auto import tqdm

    n_layers = len(model.blocks)
    if method == "streamline":
        raise InputError("method 'streamline' removes blocks itself: call residscope.surgery.streamline")
    check_heal_options(method, last_k=last_k, n_layers=n_layers, lora_modules=lora_modules, steps=steps,
                       grad_accum=grad_accum, lr=lr, lora_rank=lora_rank)
    if model.offload is not None:
        raise InputError("heal trains the model's weights, which needs them in memory: load the model without --offload")
    train_batches, eval_batches = list(train_batches), list(eval_batches)
    if not train_batches or not eval_batches:
        raise InputError("heal needs training and evaluation batches")
    start = time.perf_counter()
    torch.manual_seed(seed)
    flags = {p: p.requires_grad for p in model.parameters()}
    lora = None
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if method == "partial":
            trained = _partial(model, last_k)
        else:
            lora, trained = _inject_lora(model, lora_modules, lora_rank, lora_alpha, seed)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise InputError("nothing to train: --last-k 0 with no lm_head")
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        warmup = max(1, steps // 10) if warmup is None else warmup
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, steps))
        eval_every = eval_every or max(1, steps // 5)
        order = _batch_order(len(train_batches), steps * grad_accum, seed)

        before = held_out_ppl(model, eval_batches)
        curve = [{"step": 0, "train_loss": None, "ppl": before}]
        losses, tokens = [], 0
        model.train()
        bar = tqdm(range(steps), desc=f"heal ({method})", disable=not progress, leave=False)
        for step in bar:
            micro = [train_batches[i] for i in order[step * grad_accum: (step + 1) * grad_accum]]
            loss, n = _step(model, micro, optimizer)
            schedule.step()
            losses.append(loss)
            tokens += n
            bar.set_postfix(loss=f"{loss:.3f}")
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                recent = losses[-eval_every:]
                curve.append({"step": step + 1, "train_loss": sum(recent) / len(recent),
                              "ppl": held_out_ppl(model, eval_batches)})
        model.eval()
        if lora is not None:
            _merge_lora(model)
            lora = None
    finally:
        if lora is not None:  # failed half-way: leave the model as it was given (adapters removed, not merged)
            _unload_lora(model)
        for p in model.parameters():
            p.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.eval()
    note = ("this model has nothing removed: healing fine-tunes it as it is (compare with the dense model's "
            "perplexity to see what it buys)") if nothing_removed else None
    return HealResult(method=method, trained=trained, trainable_params=sum(p.numel() for p in params), steps=steps,
                      grad_accum=grad_accum, lr=lr, seed=seed, train_tokens=tokens, curve=curve, before=before,
                      after=curve[-1]["ppl"], seconds=time.perf_counter() - start, note=note, eval_source=eval_source,
                      train_source=train_source, losses=losses)


def held_out_ppl(model, eval_batches: Sequence[Batch]) -> float:
    """Perplexity on `eval_batches` in eval mode, the model's training mode restored after."""
    was = model.training
    model.eval()
    try:
        return perplexity(model, eval_batches, progress=False).ppl
    finally:
        model.train(was)


def _lr_factor(step: int, warmup: int, steps: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def _batch_order(n_batches: int, needed: int, seed: int) -> list[int]:
    """Micro-batch indices for the whole run: seeded permutations of the batches, one epoch after another."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < needed:
        order += torch.randperm(n_batches, generator=gen).tolist()
    return order[:needed]


def _step(model, micro: list[Batch], optimizer) -> tuple[float, int]:
    """One optimizer step over the micro-batches: gradient of the mean NLL over all their predicted tokens."""
    from .criteria import nll_sum_differentiable

    counts = []
    for batch in micro:
        ids, mask = unpack_batch(batch)
        counts.append(int(((mask[:, 1:].bool() & mask[:, :-1].bool()).sum()) if mask is not None
                          else ids[:, 1:].numel()))
    total = sum(counts)
    if total == 0:
        raise InputError("training batches: no predicted tokens (rows need 2 or more tokens)")
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for batch in micro:
        ids, mask = unpack_batch(batch)
        ids = ids.to(model.device)
        mask = mask.to(model.device) if mask is not None else None
        nll, _ = nll_sum_differentiable(model(ids, attention_mask=mask), ids, mask)
        (nll / total).backward()  # accumulated: the step's gradient is that of the mean over all its tokens
        loss_sum += float(nll.detach())
    optimizer.step()
    return loss_sum / total, total


def _partial(model, last_k: int) -> list[str]:
    """Unfreeze the last `last_k` blocks and lm_head (the unembedding; tied to the embedding when the model ties them)."""
    n = len(model.blocks)
    names = []
    for name, p in model.named_parameters():
        layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
        if (layer is not None and layer >= n - last_k) or name.startswith("unembed."):
            p.requires_grad_(True)
            names.append(name)
    if model.cfg.tie_embeddings:  # named once, as embed.weight, by named_parameters
        model.unembed.weight.requires_grad_(True)
        names.append("unembed.weight (tied to embed.weight)")
    return names


def _inject_lora(model, modules: Sequence[str], rank: int, alpha: float, seed: int):
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise InputError("--method lora needs the peft package: pip install peft") from None
    torch.manual_seed(seed)  # LoRA's A matrices are initialised at random
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(modules), bias="none")
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    adapted = sorted({name.rsplit(".lora_", 1)[0] for name, _ in model.named_parameters() if "lora_" in name})
    return config, adapted


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _replace(model, name: str, new) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _merge_lora(model) -> None:
    """Fold every adapter into its base nn.Linear (W += B A * alpha / r) and put the plain layer back."""
    for name, layer in _lora_layers(model):
        layer.merge()
        _replace(model, name, layer.get_base_layer())


def _unload_lora(model) -> None:
    for name, layer in _lora_layers(model):
        _replace(model, name, layer.get_base_layer())
