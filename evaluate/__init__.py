"""`residscope.evaluate`: evaluation that shows what pruning breaks, in one place.

The offline tasks (`evaluate_model`, `compare_reports`, `report_table`; `residscope evaluate`), the before/after cut
(`cut_comparison`; `residscope evaluate --cut`) and, when lm-evaluation-harness is installed, the harness model:
importing this package registers the model type "residscope" with lm_eval, so

    import lm_eval, residscope.evaluate
    lm_eval.simple_evaluate(model="residscope", model_args="pretrained=pruned/", tasks=["hellaswag"])

and `python -m residscope.evaluate --model residscope --model_args pretrained=pruned/ --tasks hellaswag` (lm_eval's
own command line) work. The implementations live in `analyses/evaluation.py`, `analyses/eval_tasks.py`,
`analyses/lm_eval_model.py` and `surgery/cut_lens.py`; this package only gathers them under the name the docs use.
"""

from __future__ import annotations

import importlib.util

from residscope.analyses.eval_tasks import task_items
from residscope.analyses.evaluation import (EvaluationReport, TaskResult, compare_reports, evaluate_model,
                                            greedy_until, loglikelihoods, report_table, rolling_loglikelihood)
from residscope.surgery.cut_lens import CutComparison, cut_comparison, cut_table

__all__ = ["CutComparison", "EvaluationReport", "TaskResult", "compare_reports", "cut_comparison", "cut_table",
           "evaluate_model", "greedy_until", "loglikelihoods", "report_table", "rolling_loglikelihood", "task_items"]

if importlib.util.find_spec("lm_eval") is not None:  # registers "residscope" with the harness; optional dependency
    from residscope.analyses.lm_eval_model import ResidscopeLM, run_lm_eval, write_lm_eval_tasks

    __all__ += ["ResidscopeLM", "run_lm_eval", "write_lm_eval_tasks"]
