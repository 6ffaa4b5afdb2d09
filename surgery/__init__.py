"""residscope.surgery: cutting a model and saving the result.

ShortGPT Block Influence and the other layer scores (`influence`), layer and sub-layer removal (`removal`), the
comparison of removal choices by held-out perplexity (`compare`), export as a standard checkpoint (`export`), and
their figures (`plots`). May import `residscope.common`, `residscope.model`, `residscope.runtime` (batch loop, data
parallelism) and `residscope.analyses` (perplexity, corpus); never `studies` or `apps`.
"""

from .compare import RemovalComparison, RemovalRow, compare_removals, removal_for
from .export import PRUNING_FILE, SUBLAYER_KEY, pruning_record, save_pretrained
from .influence import (BASELINES, METRICS, InfluenceResult, block_influence, block_influence_result, influence_results,
                        removal_order)
from .removal import layer_origin, remove_layers, remove_sublayers, removed_sublayers

__all__ = [
    "BASELINES", "METRICS", "PRUNING_FILE", "SUBLAYER_KEY", "InfluenceResult", "RemovalComparison", "RemovalRow",
    "block_influence", "block_influence_result", "compare_removals", "influence_results", "layer_origin",
    "pruning_record", "remove_layers", "remove_sublayers", "removed_sublayers", "removal_for", "removal_order",
    "save_pretrained",
]
