"""What surgery adds to an export: the record of why layers were removed (metric, scores, calibration, perplexity).

Writing the checkpoint itself is the model's business (`residscope.model.export`, also `Decoder.save_pretrained`).
"""

from __future__ import annotations

from residscope.model.hf_config import SUBLAYER_KEY
from residscope.model.export import PRUNING_FILE, save_pretrained

__all__ = ["PRUNING_FILE", "SUBLAYER_KEY", "pruning_record", "save_pretrained"]


def pruning_record(*, removed_layers: list[int], n_layers_before: int, metric: str | None = None,
                   scores=None, influence=None, calibration: str | None = None, n_tokens: int | None = None,
                   perplexity: dict | None = None) -> dict:
    """The residscope_pruning.json fields describing one removal (layers in original numbering, removal order)."""
    record = {"removed_layers": list(removed_layers), "n_layers_before": n_layers_before, "metric": metric}
    if influence is not None:
        record.update(metric=influence.metric, scores=influence.scores.tolist(), shortgpt_compat=influence.shortgpt_compat,
                      calibration=influence.source, calibration_tokens=influence.n_tokens)
    if scores is not None:
        record["scores"] = [None if s is None else float(s) for s in scores]
    if calibration is not None:
        record["calibration"] = calibration
    if n_tokens is not None:
        record["calibration_tokens"] = n_tokens
    if perplexity is not None:
        record["perplexity"] = perplexity
    return record
