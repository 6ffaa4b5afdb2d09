"""residscope.analyses: what we measure in a model, as plain functions over a model and data that return small
dataclasses or tensors.

Text to measure on (`corpus`), perplexity (`perplexity`), the logit lens (`logit_lens`), positional vectors and attention
sinks (`positional`, the whole study in `positional_study`), RoPE base / context-length bounds (`rope_bound`), context
extension and its evaluations (`extension`, with the passkey prompts in `passkey`; RULER's synthetic long-context tasks
in `ruler`, their prompts in `ruler_tasks`), and the zoo trainer that builds the
models those experiments run on (`zoo_train`). Figures live apart, in the `*_plots` modules.
May import `residscope.common`, `residscope.model` and `residscope.runtime` (the batch loop, data parallelism); never
`surgery`, `probes`, `studies` or `apps`.

The names most notebooks need are re-exported here:

    from residscope.analyses import calibration_batches, positional_study, extension_perplexity
"""

from .corpus import builtin_text, calibration_batches
from .extension import (METHODS, apply_method, applicable_methods, extension_perplexity, passkey_accuracy, passkey_study,
                        positional_drift, rope_setting, trained_window)
from .logit_lens import LogitLens, logit_lens
from .perplexity import PerplexityResult, heldout_perplexity, perplexity
from .positional import attention_statistics, decompose_positions, describe_positions, removal_hooks, removal_study
from .positional_study import PositionalStudy, positional_study
from .rope_bound import base_lower_bound, context_bound, model_bounds, ntk_params, paper_table, rope_frequencies

__all__ = [
    "METHODS", "LogitLens", "PerplexityResult", "PositionalStudy", "applicable_methods", "apply_method",
    "attention_statistics", "base_lower_bound", "builtin_text", "calibration_batches", "context_bound",
    "decompose_positions", "describe_positions", "extension_perplexity", "heldout_perplexity", "logit_lens",
    "model_bounds", "ntk_params", "paper_table", "passkey_accuracy", "passkey_study", "perplexity", "positional_drift",
    "positional_study", "removal_hooks", "removal_study", "rope_frequencies", "rope_setting", "trained_window",
]
