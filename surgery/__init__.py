"""residscope.surgery: ShortGPT Block Influence, layer and sub-layer removal, export as a standard checkpoint."""

from .export import PRUNING_FILE, SUBLAYER_KEY, pruning_record, save_pretrained
from .influence import BASELINES, METRICS, InfluenceResult, block_influence, block_influence_result, removal_order
from .removal import layer_origin, remove_layers, remove_sublayers, removed_sublayers

__all__ = [
    "BASELINES", "METRICS", "PRUNING_FILE", "SUBLAYER_KEY", "InfluenceResult", "block_influence", "block_influence_result",
    "layer_origin", "pruning_record", "remove_layers", "remove_sublayers", "removed_sublayers", "removal_order",
    "save_pretrained",
]
