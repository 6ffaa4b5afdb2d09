"""residscope models inside lm-evaluation-harness (`pip install lm-eval`, or `residscope[eval]`).

Importing this module registers the model type "residscope" with lm_eval's registry, so a pruned checkpoint runs on
any harness task the usual way (datasets from the hub, or a local cache with HF_DATASETS_OFFLINE=1):

    python -m residscope.analyses.lm_eval_model --model residscope --model_args pretrained=PRUNED_DIR,dtype=float32 \\
        --tasks hellaswag,mmlu --batch_size 8
    # or in Python
    import lm_eval, residscope.analyses.lm_eval_model
    lm_eval.simple_evaluate(model="residscope", model_args="pretrained=smollm2-135m", tasks=["hellaswag"])
    lm_eval.simple_evaluate(model=ResidscopeLM(model=my_decoder), tasks=[...])   # a model already in memory

The three request types are residscope's own scorers (`residscope.analyses.evaluation`), so `residscope evaluate` and
the harness give the same numbers on the same items. Generation is greedy (the harness's `do_sample`/`temperature`
are ignored, with one warning). `write_lm_eval_tasks(folder)` writes residscope's offline tasks (addition, brackets,
cloze, passkey) as harness task files reading local jsonl records generated with a seed:

    python -m residscope.analyses.lm_eval_model --model residscope --model_args pretrained=smollm2-135m \\
        --include_path FOLDER --tasks residscope_addition,residscope_cloze

Nothing else in residscope imports lm_eval: this module is imported only when the harness is wanted.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # a clear line instead of a traceback deep in an import chain
    from residscope.model.errors import InputError

    raise InputError("lm-evaluation-harness is not installed: pip install lm-eval (or 'residscope[eval]')") from e

from residscope.model.errors import InputError

from .evaluation import greedy_until, loglikelihoods, rolling_loglikelihood

log = logging.getLogger(__name__)

TASK_PREFIX = "residscope_"


@register_model("residscope")
class ResidscopeLM(LM):
    """An lm_eval LM backed by a residscope Decoder: `pretrained` (alias, folder or .gguf) or `model` (in memory)."""

    def __init__(self, pretrained: str | None = None, *, model=None, device: str = "cpu", dtype: str = "float32",
                 batch_size: int | str = 8, max_gen_toks: int = 256, **unused):
        super().__init__()
        if (pretrained is None) == (model is None):
            raise InputError("ResidscopeLM: give either pretrained=<alias, folder or .gguf> or model=<Decoder>")
        if model is None:
            from residscope.model import load_model

            model = load_model(pretrained, device=device, dtype=dtype)
        if unused:
            log.info("ResidscopeLM ignores %s", ", ".join(sorted(unused)))
        self.model = model
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> 8
        self.max_gen_toks = int(max_gen_toks)
        self._warned_sampling = False

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.source or "residscope").replace("/", "__")

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return loglikelihoods(self.model, [tuple(r.args) for r in requests], batch_size=self.batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [rolling_loglikelihood(self.model, r.args[0]) for r in requests]

    def generate_until(self, requests) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same stop strings and length decode together
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(self._gen_settings(r.args[1]), sort_keys=True), []).append(i)
        for key, idx in groups.items():
            settings = json.loads(key)
            texts = greedy_until(self.model, [requests[i].args[0] for i in idx], until=settings["until"],
                                 max_new_tokens=settings["max_gen_toks"], batch_size=self.batch_size)
            for i, t in zip(idx, texts):
                out[i] = t
        return out  # type: ignore[return-value]

    def _gen_settings(self, gen_kwargs: dict) -> dict:
        kw = dict(gen_kwargs or {})
        if (kw.get("do_sample") or kw.get("temperature", 0) not in (0, 0.0, None)) and not self._warned_sampling:
            log.warning("ResidscopeLM decodes greedily; do_sample/temperature are ignored")
            self._warned_sampling = True
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        eos = self.model.tokenizer.eos_token
        if eos and eos not in until:
            until.append(eos)
        return {"until": until, "max_gen_toks": int(kw.get("max_gen_toks", self.max_gen_toks))}


# ---- residscope's offline tasks as harness task files -----------------------------------------------------------------

_GENERATE = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: {max_gen_toks}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ['\\s+']  # single quotes: YAML keeps the backslash
metadata:
  version: 1.0
  residscope_seed: {seed}
"""
_LOGLIKELIHOOD = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
  residscope_seed: {seed}
"""


def passkey_items(n: int, seed: int = 0, *, n_filler: int = 20) -> list[dict]:
    """Passkey prompts with `n_filler` filler sentences at depths 0, 0.5, 1 (tokenizer-independent text)."""
    from .passkey import passkey_keys, passkey_text

    keys = passkey_keys(n, 1234 + seed)
    return [{"prompt": passkey_text(k, n_filler, d), "target": f" {k}"} for d in (0.0, 0.5, 1.0) for k in keys]


def write_lm_eval_tasks(folder: str | os.PathLike, *, n: int = 32, seed: int = 0,
                        tasks: Sequence[str] = ("addition", "brackets", "cloze", "passkey")) -> dict[str, Path]:
    """Write `<task>.jsonl` records and `residscope_<task>.yaml` harness configs into `folder` (each file atomically);
    returns {harness task name: yaml path}. The records are those `residscope evaluate` scores with the same seed."""
    from residscope.common.atomic import atomic_write_text

    from .eval_tasks import GENERATIVE, task_items

    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for task in tasks:
        items = passkey_items(max(1, n // 3), seed) if task == "passkey" else task_items(task, min(n, 64) if task == "cloze" else n, seed)
        data = folder / f"{task}.jsonl"
        atomic_write_text(data, "".join(json.dumps(it) + "\n" for it in items))
        name = TASK_PREFIX + task
        if task in GENERATIVE or task == "passkey":
            text = _GENERATE.format(task=name, data=json.dumps(str(data)), seed=seed,
                                    max_gen_toks={"addition": 8, "brackets": 24, "passkey": 8}[task])
        else:
            text = _LOGLIKELIHOOD.format(task=name, data=json.dumps(str(data)), seed=seed)
        written[name] = atomic_write_text(folder / f"{name}.yaml", text)
    return written


def run_lm_eval(model, tasks: Sequence[str], *, limit: int | None = None, batch_size: int = 8,
                include_path: str | os.PathLike | None = None, n: int = 32, seed: int = 0) -> dict:
    """`lm_eval.simple_evaluate` on an in-memory model; returns {task: {metric: value}} (the harness's "results").
    residscope's own tasks (`residscope_addition`, ...) are written for the run (`n` items, `seed`) when no
    `include_path` is given."""
    import tempfile

    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise InputError("--lm-eval: no task given")
    own = [t.removeprefix(TASK_PREFIX) for t in tasks if t.startswith(TASK_PREFIX)]
    with tempfile.TemporaryDirectory() as scratch:
        if own and include_path is None:
            write_lm_eval_tasks(scratch, n=n, seed=seed, tasks=own)
            include_path = scratch
        # indexing the harness's thousands of task files takes a while: skipped when only residscope's are asked for
        manager = TaskManager(include_path=str(include_path) if include_path is not None else None,
                              include_defaults=len(own) < len(tasks))
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise InputError(f"--lm-eval: unknown task {unknown[0]!r} (residscope's: "
                             f"{', '.join(TASK_PREFIX + t for t in ('addition', 'brackets', 'cloze', 'passkey'))})")
        out = lm_eval.simple_evaluate(model=ResidscopeLM(model=model, batch_size=batch_size), tasks=tasks,
                                      limit=limit, task_manager=manager, log_samples=False)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
            for task, metrics in out["results"].items()}


def main(argv: list[str] | None = None) -> None:
    """lm_eval's own command line, with the "residscope" model type registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
