"""Evaluation beyond perplexity: what a model gets right on small generative and cloze tasks, and how a cut changes it.

Three scoring primitives, shared with the lm-evaluation-harness adapter (`residscope.analyses.lm_eval_model`) so both
give the same numbers:
- `loglikelihoods(model, [(context, continuation)])` -> [(log p(continuation | context), is_greedy)], lm-eval's
  tokenisation: the continuation's tokens are those of `context + continuation` after the context's (a trailing space
  of the context moves to the continuation), BOS in front as the model's `to_tokens` puts it;
- `rolling_loglikelihood(model, text)`: the log-likelihood of all tokens of a text in windows of the model's context;
- `greedy_until(model, prompts, until, max_new_tokens)`: greedy decoding with the KV cache, stopped at a stop string.

`evaluate_model(model, tasks)` runs the offline tasks (`eval_tasks`: addition, brackets, cloze; plus `passkey` from the
context-extension module) and returns an `EvaluationReport`; `compare_reports(before, after)` lines two up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from residscope.model.errors import InputError

from .eval_tasks import GENERATIVE, ITEM_TASKS, exact_match, task_items

TASKS = ITEM_TASKS + ("passkey",)
DEFAULT_TASKS = ("addition", "brackets", "cloze", "passkey")
_MAX_NEW = {"addition": 8, "brackets": 24}


def max_length(model) -> int:
    """Tokens a forward may hold: the trained context, 2048 when the config does not say."""
    return int(model.cfg.max_position_embeddings or 2048)


def _need_tokenizer(model):
    if model.tokenizer is None:
        raise InputError("evaluation needs the model's tokenizer")
    return model.tokenizer


def encode(model, text: str) -> list[int]:
    """Token ids of `text` as the model's `to_tokens` makes them (BOS per the model's convention)."""
    if text == "":
        bos = model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else model.tokenizer.eos_token_id
        return [bos]
    return model.to_tokens(text, truncate=False)[0].tolist()


def context_continuation_ids(model, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split the way lm-evaluation-harness splits them (see the module docstring)."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = encode(model, stripped + continuation)
    n_ctx = len(encode(model, stripped)) if stripped else 1  # an empty context is the BOS alone
    if n_ctx >= len(whole):
        raise InputError(f"continuation {continuation!r} adds no tokens to its context")
    return whole[:n_ctx], whole[n_ctx:]


@torch.inference_mode()
def score_ids(model, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 8) -> list[tuple[float, bool]]:
    """(sum of log-probabilities of the continuation ids, whether each was the argmax) per (context, continuation)
    pair of id lists; contexts too long for the model lose their first tokens."""
    limit = max_length(model)
    rows = []
    for ctx, cont in pairs:
        ids = (ctx + cont)[-(limit + 1):][:-1]  # the last continuation token is predicted, never fed
        rows.append((ids, len(cont)))
    out: list[tuple[float, bool]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # [batch, pos], padded on the right
        mask = torch.zeros_like(ids)
        for r, (row, _) in enumerate(chunk):
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        logits = model(ids.to(model.device), attention_mask=mask.to(model.device)).float()  # [batch, pos, vocab]
        logp = logits.log_softmax(-1)
        for r, (row, n_cont) in enumerate(chunk):
            pairs_row = pairs[start + r]
            target = torch.tensor(pairs_row[1], device=logp.device)  # [n_cont]
            pred = logp[r, len(row) - n_cont:len(row)]  # [n_cont, vocab]
            lp = pred.gather(-1, target[:, None])[:, 0]  # [n_cont]
            out.append((float(lp.double().sum()), bool((pred.argmax(-1) == target).all())))
    return out


def loglikelihoods(model, requests: Sequence[tuple[str, str]], *, batch_size: int = 8) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is_greedy) per (context, continuation) text pair."""
    _need_tokenizer(model)
    return score_ids(model, [context_continuation_ids(model, c, x) for c, x in requests], batch_size=batch_size)


@torch.inference_mode()
def rolling_loglikelihood(model, text: str) -> float:
    """log p(text) summed over every token after the BOS, in windows of the model's context; each window predicts new
    tokens only, with as much preceding text as fits."""
    _need_tokenizer(model)
    ids = encode(model, text)
    limit, total = max_length(model), 0.0
    for start in range(1, len(ids), limit - 1):  # targets ids[start:end], fed ids[first:end - 1]
        end = min(start + limit - 1, len(ids))
        first = max(0, end - limit)
        window = torch.tensor(ids[first:end], device=model.device)[None]  # [1, pos]
        logp = model(window[:, :-1]).float().log_softmax(-1)[0]  # [pos - 1, vocab]
        targets = window[0, start - first:]  # [n_new]
        total += float(logp[start - first - 1:].gather(-1, targets[:, None]).double().sum())
    return total


@torch.inference_mode()
def greedy_until(model, prompts: Sequence[str], *, until: Sequence[str] = ("\n",), max_new_tokens: int = 32,
                 batch_size: int = 8) -> list[str]:
    """Greedy continuations (KV cache, left padding within a batch), each cut before the first stop string."""
    from residscope.model.decoder import KVCache

    tok = _need_tokenizer(model)
    eos = tok.eos_token_id
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = [encode(model, p)[-(max_length(model) - max_new_tokens):] for p in prompts[start:start + batch_size]]
        width = max(map(len, rows))
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos or 0)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)  # [batch, pos], padded on the left
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        cache, new = KVCache(), []
        step, step_mask = ids, mask
        done = torch.zeros(len(rows), dtype=torch.bool, device=ids.device)  # [batch]
        texts = [""] * len(rows)
        for _ in range(max_new_tokens):
            nxt = model(step, attention_mask=step_mask, kv_cache=cache, logits_to_keep=1)[:, -1].argmax(-1)  # [batch]
            new.append(nxt)
            if eos is not None:
                done |= nxt == eos
            texts = [tok.decode(torch.stack(new, 1)[r].tolist(), skip_special_tokens=True) for r in range(len(rows))]
            done |= torch.tensor([any(s in t for s in until) for t in texts], device=ids.device)
            if bool(done.all()):
                break
            step, step_mask = nxt[:, None], torch.ones_like(nxt[:, None])
        outputs += [_cut(t, until) for t in texts]
    return outputs


def _cut(text: str, until: Sequence[str]) -> str:
    for s in until:
        if s and s in text:
            text = text[:text.index(s)]
    return text


# ---- the task suite -------------------------------------------------------------------------------------------------

@dataclass
class TaskResult:
    task: str
    metric: str  # "exact_match" (generated) or "greedy_match" (every target token is the argmax)
    accuracy: float
    n: int
    n_correct: int
    mean_logprob: float | None = None  # cloze: mean log p(target word) per item, nats
    examples: list[dict] = field(default_factory=list)  # the first few items with the model's answer

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvaluationReport:
    model: str
    n_layers: int
    layer_origin: list[int]
    seed: int
    results: dict[str, TaskResult]

    def to_dict(self) -> dict:
        return {"model": self.model, "n_layers": self.n_layers, "layer_origin": self.layer_origin, "seed": self.seed,
                "results": {k: v.to_dict() for k, v in self.results.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "EvaluationReport":
        try:
            return cls(model=data["model"], n_layers=data["n_layers"], layer_origin=data["layer_origin"],
                       seed=data["seed"], results={k: TaskResult(**v) for k, v in data["results"].items()})
        except (KeyError, TypeError) as e:
            raise InputError(f"not an evaluation report written by `residscope evaluate --json` ({e})") from None


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """Task names from "addition,cloze" or a list; "all" = every task. Unknown names are refused in one line."""
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise InputError(f"--tasks: unknown task {unknown[0]!r}" if unknown else "--tasks: no task given"
                         + f" (tasks: {', '.join(TASKS)}, or all)")
    return list(dict.fromkeys(names))


def run_item_task(model, task: str, n: int, seed: int = 0, *, batch_size: int = 8, n_examples: int = 3) -> TaskResult:
    """One of addition / brackets (greedy generation, exact match) or cloze (greedy match of the target tokens)."""
    items = task_items(task, n, seed)
    if task in GENERATIVE:
        answers = greedy_until(model, [it["prompt"] for it in items], until=("\n",), max_new_tokens=_MAX_NEW[task],
                               batch_size=batch_size)
        hits = [exact_match(a, it["target"]) for a, it in zip(answers, items)]
        examples = [{"prompt_end": it["prompt"].rsplit("\n", 1)[-1], "target": it["target"].strip(),
                     "answer": a.strip(), "correct": h} for it, a, h in zip(items, answers, hits)]
        return TaskResult(task, "exact_match", sum(hits) / len(items), len(items), sum(hits),
                          examples=examples[:n_examples])
    scored = loglikelihoods(model, [(it["context"], it["target"]) for it in items], batch_size=batch_size)
    hits = [greedy for _, greedy in scored]
    examples = [{"context_end": it["context"][-60:], "target": it["target"].strip(), "logprob": round(lp, 4),
                 "correct": g} for it, (lp, g) in zip(items, scored)]
    return TaskResult(task, "greedy_match", sum(hits) / len(items), len(items), sum(hits),
                      mean_logprob=sum(lp for lp, _ in scored) / len(items), examples=examples[:n_examples])


def run_passkey(model, n: int, seed: int = 0, *, length: int | None = None) -> TaskResult:
    """Passkey retrieval (`extension.passkey_accuracy`) at one length (default: half the trained context, between 256
    and 1024 tokens) and depths 0, 0.5, 1, `n` keys each."""
    from .extension import passkey_accuracy

    length = length or min(1024, max(256, max_length(model) // 2))
    rows = passkey_accuracy(model, [length], (0.0, 0.5, 1.0), n_keys=n, seed=1234 + seed, progress=False)
    hits = sum(round(r.accuracy * r.n_keys) for r in rows)
    total = sum(r.n_keys for r in rows)
    examples = [{"depth": r.depth, "prompt_tokens": r.prompt_tokens, "accuracy": r.accuracy, "answers": r.answers}
                for r in rows]
    return TaskResult("passkey", "exact_match", hits / total, total, hits, examples=examples)


def evaluate_model(model, tasks: Sequence[str] = DEFAULT_TASKS, *, n: int = 32, seed: int = 0, batch_size: int = 8,
                   name: str | None = None, progress: bool = False) -> EvaluationReport:
    """Run `tasks` on `model`; every task draws its items from `seed`, so two models see the same items."""
    from tqdm.auto import tqdm

    tasks = parse_tasks(tasks)
    if n < 1:
        raise InputError(f"--n must be >= 1 (items per task), got {n}")
    _need_tokenizer(model)
    results = {}
    for task in tqdm(tasks, desc="evaluate", disable=not progress):
        if task == "passkey":
            results[task] = run_passkey(model, max(1, n // 3), seed)
        else:
            results[task] = run_item_task(model, task, min(n, 64) if task == "cloze" else n, seed,
                                          batch_size=batch_size)
    return EvaluationReport(model=name or str(model.source), n_layers=model.cfg.n_layers,
                            layer_origin=[int(i) for i in model.layer_origin], seed=seed, results=results)


@dataclass
class ComparisonRow:
    task: str
    metric: str
    baseline: float
    model: float
    delta: float  # model - baseline (accuracy points, 0..1)
    n: int


def compare_reports(baseline: EvaluationReport, model: EvaluationReport) -> list[ComparisonRow]:
    """Per task both reports share: accuracy before (baseline, e.g. the dense model) and after (e.g. pruned)."""
    if baseline.seed != model.seed:
        raise InputError(f"--baseline was evaluated with seed {baseline.seed}, the model with {model.seed}: "
                         "the items differ")
    rows = []
    for task, r in model.results.items():
        b = baseline.results.get(task)
        if b is None or b.n != r.n:
            continue
        rows.append(ComparisonRow(task, r.metric, b.accuracy, r.accuracy, r.accuracy - b.accuracy, r.n))
    return rows


def report_table(report: EvaluationReport, baseline: EvaluationReport | None = None) -> str:
    """A plain-text table of a report (and of its comparison with a baseline)."""
    lines = [f"{report.model}: {report.n_layers} layers, seed {report.seed}"]
    if baseline is None:
        lines.append(f"{'task':<10} {'metric':<13} {'accuracy':>9} {'n':>5}")
        for r in report.results.values():
            extra = f"  mean log p {r.mean_logprob:.3f}" if r.mean_logprob is not None else ""
            lines.append(f"{r.task:<10} {r.metric:<13} {r.accuracy:>9.3f} {r.n:>5}{extra}")
        return "\n".join(lines)
    lines.append(f"baseline {baseline.model}: {baseline.n_layers} layers")
    lines.append(f"{'task':<10} {'metric':<13} {'baseline':>9} {'model':>9} {'delta':>8} {'n':>5}")
    for row in compare_reports(baseline, report):
        lines.append(f"{row.task:<10} {row.metric:<13} {row.baseline:>9.3f} {row.model:>9.3f} {row.delta:>+8.3f} {row.n:>5}")
    return "\n".join(lines)
