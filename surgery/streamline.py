"""LLM-Streamline (Chen et al. 2024, "Streamlining Redundant Layers to Compress Large Language Models"): remove a
contiguous span of blocks and train one block to do the span's work.

    span       the n + 1 consecutive blocks [l, l + n] whose entering and leaving streams are closest: mean
               arccos(cos(x_l, x_{l+n+1}))/pi on each sequence's last token (the `angular-block` distance; the paper's
               code uses the cosine of all tokens, which orders spans alike on the models we tried)
    replace    block l is kept, initialised with its own weights as the reference code does, and trained alone to
               map the stream entering the span to the stream leaving it, AdamW with linear warm-up and decay,
               gradients clipped to norm 5 (the reference's max_norm); blocks l+1 .. l+n are removed, so the model
               loses n blocks
    loss       "relative" (default): each token's squared error divided by the target token's mean square, averaged
               over real tokens; "mse": the reference's plain MSE(block_l(x_l), x_{l+n+1}). Models with massive
               activations (SmolLM2's first token has a stream ~175x the others' norm) put nearly all of the plain MSE
               on that one token: on SmolLM2 (8 of 30 removed, 20 steps) plain MSE made held-out perplexity worse
               (302 -> 809; 341 at a 10x lower rate) where the relative loss improves it (302 -> 208)
    result     a plain model of the same architecture with n fewer blocks: it exports and reloads like any pruned
               model (the trained block keeps block l's place and name)

The streams are taken from the dense model once, before anything is removed; the held-out perplexity is measured with
the span removed and block l untrained (`before`), during training and after (`HealResult.curve`, whose train_loss is
the stream loss here, relative or MSE). The model is changed in place and must be in memory.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from residscope.common.batches import Batch, unpack_batch
from residscope.model.errors import InputError

from .criteria import angular_distances
from .heal import HealResult, _batch_order, _lr_factor, held_out_ppl
from .removal import remove_layers

CLIP_NORM = 5.0  # LLM-Streamline's clip_grad_norm_ max_norm
LOSSES = ("relative", "mse")


def check_streamline_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise InputError(f"--streamline-loss must be one of {', '.join(LOSSES)}; got {loss!r}")


def check_streamline(n: int, n_layers: int, arg: str = "--remove", loss: str = "relative") -> None:
    check_streamline_loss(loss)
    if not 1 <= n <= n_layers - 1:
        raise InputError(f"{arg}: streamline removes 1 to {n_layers - 1} blocks of this {n_layers}-layer model "
                         f"(n + 1 consecutive blocks become one), got {n}")


def streamline(model, train_batches: Sequence[Batch], eval_batches: Sequence[Batch], n: int, *,
               select_batches: Sequence[Batch] | None = None, loss: str = "relative", steps: int = 100,
               grad_accum: int = 1, lr: float = 1e-4, weight_decay: float = 0.0, warmup: int | None = None,
               eval_every: int | None = None, seed: int = 0, progress: bool = True, eval_source: str | None = None,
               train_source: str | None = None) -> HealResult:
    """Replace the most redundant n + 1 consecutive blocks of `model` by one trained block, in place (see the module
    doc). `select_batches` choose the span (default: the training batches). Returns the healing record, with
    `streamline` = {"start", "removed", "loss", "span_distance", "distances", "mse_before", "mse_after"} (the
    training loss's value over all training tokens; block indices of the model as given)."""
    from tqdm.auto import tqdm

    from .heal import check_heal_options

    n_layers = len(model.blocks)
    check_streamline(n, n_layers, loss=loss)
    check_heal_options("partial", steps=steps, grad_accum=grad_accum, lr=lr)
    if model.offload is not None:
        raise InputError("streamline trains a block, which needs the model in memory: load it without --offload")
    train_batches, eval_batches = list(train_batches), list(eval_batches)
    if not train_batches or not eval_batches:
        raise InputError("streamline needs training and evaluation batches")
    began = time.perf_counter()
    distances, _ = angular_distances(model, list(select_batches or train_batches), n + 1, progress=progress)
    start = int(torch.argmin(distances))  # the span [start, start + n]; the lowest start on ties

    pairs = []  # (stream entering the span, stream leaving it, mask) per training batch, from the dense model
    with torch.no_grad():  # not inference_mode: these tensors enter the autograd graph of the training loss
        for batch in train_batches:
            ids, mask = unpack_batch(batch)
            ids = ids.to(model.device)
            mask = mask.to(model.device) if mask is not None else None
            x_in = model(ids, attention_mask=mask, stop_at_layer=start)  # [batch, pos, d_model]
            x_out = model(ids, attention_mask=mask, stop_at_layer=start + n + 1)  # [batch, pos, d_model]
            pairs.append((x_in, x_out, mask))
    removed = list(range(start + 1, start + n + 1))
    remove_layers(model, removed, copy=False)

    def mse(i: int) -> tuple[torch.Tensor, int]:
        """Sum over real tokens of each token's error (mean square, relative to the target's with loss "relative"),
        and the token count, for training batch i."""
        x_in, x_out, mask = pairs[i]
        pred = model(x_in, attention_mask=mask, start_at_layer=start, stop_at_layer=start + 1)  # [batch, pos, d_model]
        err = (pred.float() - x_out.float()).pow(2).mean(-1)  # [batch, pos]
        if loss == "relative":
            err = err / x_out.float().pow(2).mean(-1).clamp_min(1e-12)  # [batch, pos]
        if mask is not None:
            err = err * mask.to(err.dtype)
            return err.sum(), int(mask.sum())
        return err.sum(), err.numel()

    def mean_mse() -> float:
        with torch.no_grad():
            total = [mse(i) for i in range(len(pairs))]
        return sum(float(s) for s, _ in total) / max(1, sum(k for _, k in total))

    torch.manual_seed(seed)
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        block = model.blocks[start]
        params = list(block.parameters())
        for p in params:
            p.requires_grad_(True)
        trained = [f"blocks.{start}.{name}" for name, _ in block.named_parameters()]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        warmup = max(1, steps // 10) if warmup is None else warmup
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, steps))
        eval_every = eval_every or max(1, steps // 5)
        order = _batch_order(len(pairs), steps * grad_accum, seed)
        mse_before, before = mean_mse(), held_out_ppl(model, eval_batches)
        curve = [{"step": 0, "train_loss": None, "ppl": before}]
        losses, tokens = [], 0
        model.train()
        bar = tqdm(range(steps), desc="streamline", disable=not progress, leave=False)
        for step in bar:
            micro = order[step * grad_accum: (step + 1) * grad_accum]
            optimizer.zero_grad(set_to_none=True)
            parts = [mse(i) for i in micro]
            count = sum(k for _, k in parts)
            step_loss = sum(s for s, _ in parts) / max(1, count)  # mean over the step's tokens
            step_loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
            optimizer.step()
            schedule.step()
            losses.append(float(step_loss.detach()))
            tokens += count
            if not math.isfinite(losses[-1]):
                raise InputError(f"streamline: the training loss became {losses[-1]} at step {step + 1}; "
                                 "lower --lr")
            bar.set_postfix(mse=f"{losses[-1]:.4g}")
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                recent = losses[-eval_every:]
                curve.append({"step": step + 1, "train_loss": sum(recent) / len(recent),
                              "ppl": held_out_ppl(model, eval_batches)})
        model.eval()
        mse_after = mean_mse()
    finally:
        for p in model.parameters():
            p.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.eval()
    info = {"start": start, "removed": removed, "loss": loss, "span_distance": float(distances[start]),
            "distances": [float(d) for d in distances], "mse_before": mse_before, "mse_after": mse_after}
    return HealResult(method="streamline", trained=trained, trainable_params=sum(p.numel() for p in params),
                      steps=steps, grad_accum=grad_accum, lr=lr, seed=seed, train_tokens=tokens, curve=curve,
                      before=before, after=curve[-1]["ppl"], seconds=time.perf_counter() - began,
                      eval_source=eval_source, train_source=train_source, losses=losses, streamline=info)
