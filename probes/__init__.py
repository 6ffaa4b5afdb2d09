"""residscope.probes: scikit-learn probes on cached activations (what a linear read-out finds in the residual stream).

`collect_activations` caches residual streams over some batches; `position_probe` and `first_tokens_probe` fit one
probe per layer with a shuffled-label control. May import `residscope.common`, `residscope.model`, `residscope.runtime`
(batch loop) and `residscope.analyses` (hook names); never `surgery`, `studies` or `apps`.
"""

from .linear import Activations, ProbeScores, collect_activations, first_tokens_probe, position_probe, probe_layers

__all__ = ["Activations", "ProbeScores", "collect_activations", "first_tokens_probe", "position_probe", "probe_layers"]
