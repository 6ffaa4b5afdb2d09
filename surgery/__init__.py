"""residscope.surgery: cutting a model and saving the result.

Every criterion for choosing the blocks to remove behind one entry point, `select_layers` (`criteria`: ShortGPT Block
Influence and the other layer scores of `influence`, angular distance between blocks n apart, one-shot perplexity,
Taylor importance, SLEB's and BlockPruner's greedy searches, baselines), layer and sub-layer removal (`removal`), the
comparison of removal choices by held-out perplexity and their stability across calibration slices (`compare`),
healing by partial or LoRA fine-tuning (`heal`), LLM-Streamline's replacement of a span of blocks by one trained block
(`streamline`), export as a standard checkpoint (`export`), and their figures
(`plots`). May import `residscope.common`, `residscope.model`, `residscope.runtime` (batch loop, data
parallelism) and `residscope.analyses` (perplexity, corpus); never `studies` or `apps`.
"""

from .compare import RemovalComparison, RemovalRow, apply_removal, compare_removals, removal_for
from .criteria import CRITERIA, Selection, select_layers, selection
from .export import PRUNING_FILE, SUBLAYER_KEY, pruning_record, save_pretrained
from .influence import (BASELINES, METRICS, InfluenceResult, block_influence, block_influence_result, influence_results,
                        removal_order)
from .heal import HealResult, heal
from .removal import layer_origin, remove_layers, remove_sublayers, removed_sublayers
from .streamline import streamline

__all__ = [
    "BASELINES", "CRITERIA", "METRICS", "PRUNING_FILE", "SUBLAYER_KEY", "HealResult", "InfluenceResult",
    "RemovalComparison", "RemovalRow", "Selection", "apply_removal", "block_influence", "block_influence_result",
    "compare_removals", "heal", "influence_results", "layer_origin", "pruning_record", "remove_layers",
    "remove_sublayers", "removed_sublayers", "removal_for", "removal_order", "save_pretrained", "select_layers",
    "selection", "streamline",
]
