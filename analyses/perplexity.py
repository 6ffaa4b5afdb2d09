"""Perplexity: exp of the mean next-token negative log-likelihood over every predicted token of some batches.

Shared by surgery (before/after pruning), context-window extension and the CLI. Batches stream through the model one
at a time under `torch.inference_mode`; only a float64 running sum and a token count are kept between them.
Log-probabilities are computed in float32 whatever the model's dtype, so half-precision models are scored fairly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from residscope.common.batches import Batch
from residscope.model.errors import InputError


@dataclass
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per predicted token, in nats
    n_tokens: int  # predicted tokens counted (positions 1.. of each row, padding excluded)
    source: str | None = None  # where the text came from, when known

    def to_dict(self) -> dict:
        return asdict(self)


def token_nll_sum(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, int]:
    """(sum of next-token NLL, number of predicted tokens) for logits [batch, pos, vocab] and ids [batch, pos]."""
    pred = logits[:, :-1].float()  # [batch, pos-1, vocab]: float32 log-softmax inside cross_entropy
    target = ids[:, 1:]  # [batch, pos-1]
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")  # [batch*(pos-1)]
    if mask is not None:
        # a prediction counts when both the context token and the target are real
        keep = (mask[:, 1:].bool() & mask[:, :-1].bool()).reshape(-1)
        nll = nll[keep]
    return float(nll.double().sum()), int(nll.numel())


def perplexity_of(total_nll: float, n_tokens: int, what: str = "perplexity") -> tuple[float, float]:
    """(ppl, mean nll) from a sum of token NLLs. A non-finite mean is refused, naming `what`: NaN logits (a NaN weight,
    a zero logit scale) would otherwise print as `perplexity nan` and pass for a result."""
    if n_tokens == 0:
        raise InputError("batches: no predicted tokens (need at least one row with 2 or more tokens)")
    nll = total_nll / n_tokens
    if not math.isfinite(nll):
        raise InputError(f"{what}: the mean negative log-likelihood is {nll}: the model's logits are not finite "
                         "(check its weights and run-time settings such as the RoPE base or logit scale)")
    return (math.exp(nll) if nll < 700 else math.inf), nll  # exp overflows a float beyond ~709


def perplexity(model, batches: Iterable[Batch], *, progress: bool = True, desc: str = "perplexity",
               group=None) -> PerplexityResult:
    """Mean next-token NLL and perplexity of `model` over all predicted tokens of `batches` ([batch, pos] each).

    Under torch.distributed (`group`, or the default group when initialised) each rank scores its share of the batches
    and the float64 sums are all-reduced: every rank returns the whole corpus's result.
    """
    from residscope.runtime.distributed import all_reduce_sums
    from residscope.runtime.runner import forward_batches

    total_nll, n_tokens = 0.0, 0
    for run in forward_batches(model, batches, group=group, progress=progress, desc=desc):
        s, n = token_nll_sum(run.output, run.ids, run.mask)  # output: logits [batch, pos, vocab]
        total_nll += s
        n_tokens += n
    total_nll, n_tokens = all_reduce_sums([total_nll, n_tokens], group)
    ppl, nll = perplexity_of(total_nll, int(n_tokens), desc)
    return PerplexityResult(ppl=ppl, nll=nll, n_tokens=int(n_tokens))


def heldout_perplexity(
    model,
    *,
    seq_len: int = 256,
    samples: int | None = 32,
    batch_size: int = 4,
    seed: int = 0,
    text_file: str | Path | None = None,
    dataset: str | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity on `samples` seeded chunks of `seq_len` tokens from the built-in **evaluation** split (held out from
    calibration), or from a user text file / dataset. `samples=None` takes every chunk the text holds."""
    from .corpus import calibration_batches

    if model.tokenizer is None:
        raise InputError("the model has no tokenizer; call perplexity() with token-id batches instead")
    batches, source = calibration_batches(model, seq_len=seq_len, samples=samples, batch_size=batch_size, seed=seed,
                                          split="evaluation", text_file=text_file, dataset=dataset)
    result = perplexity(model, batches, progress=progress)
    result.source = source
    return result
