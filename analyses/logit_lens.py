"""The logit lens (nostalgebraist, 2020): read every block's residual stream through the final norm and the unembedding,
as if the model stopped there.

    lens = logit_lens(model, ids)        # ids [1, pos]
    lens.top_ids[l, t]                   # the token block l would predict after position t

Only the residual streams are cached (`blocks.{i}.hook_resid_post`), and only per-position summaries of the
[layer, pos, vocab] distributions are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from residscope.model.errors import InputError


@dataclass
class LogitLens:
    logits: torch.Tensor  # [pos, vocab] the model's own final logits (float32)
    top_ids: torch.Tensor  # [layer, pos] top-1 token of the lens at each block's output
    top_probs: torch.Tensor  # [layer, pos] its probability
    target_probs: torch.Tensor  # [layer, pos] probability the lens gives the model's final top-1 token at that position


@torch.inference_mode()
def logit_lens(model, ids: torch.Tensor) -> LogitLens:
    """The lens over one sequence `ids` [1, pos] at every block's output."""
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise InputError(f"ids must be one sequence [1, pos], got shape {tuple(ids.shape)}")
    names = [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
    logits, cache = model.run_with_cache(ids, names_filter=lambda name: name in names)  # logits [1, pos, vocab]
    lens_logits = torch.stack([model.unembed_residual(model.ln_final(cache[n]))[0] for n in names])  # [layer, pos, vocab]
    probs = lens_logits.float().softmax(-1)  # [layer, pos, vocab]
    top = probs.max(-1)  # values / indices [layer, pos]
    final_top1 = logits[0].argmax(-1)  # [pos]
    target = probs.gather(-1, final_top1[None, :, None].expand(probs.shape[0], -1, 1))[..., 0]  # [layer, pos]
    return LogitLens(logits=logits[0].float(), top_ids=top.indices, top_probs=top.values, target_probs=target)
