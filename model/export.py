"""Save a (pruned) Decoder as a standard Hugging Face checkpoint folder.

    config.json               the source config with `num_hidden_layers` (and `layer_types`) of the pruned model
    model.safetensors         tensors under their Hugging Face names, layers renumbered 0..n-1 (`local_to_hf`)
    tokenizer files           `tokenizer.save_pretrained`, when the model has a tokenizer
    residscope_pruning.json   what was removed and why: metric, per-layer scores, removed layers (original numbering, in
                              removal order), calibration source and size, versions of residscope / torch / transformers

`transformers.AutoModelForCausalLM.from_pretrained(folder)` loads it and gives the pruned model's logits.

Sub-layer removal (an attention or MLP half cut from a block) has no place in a transformers config. Such a model is
saved in residscope's own variant of the format: the same files, without the removed tensors, and
`residscope_removed_sublayers = {"attn": [...], "mlp": [...]}` (current layer numbering) both in config.json and in
residscope_pruning.json. The loader reads it into `DecoderConfig.removed_attn` / `removed_mlp`, so the blocks are built
without those halves. transformers would instead re-initialise the missing tensors at random, so such folders are for
residscope only. `residscope.surgery.pruning_record` adds what a removal was based on to residscope_pruning.json.

The folder is written under a temporary name next to the target and renamed into place (`atomic_dir`), so a failure
never leaves a half-written checkpoint; an existing non-empty target is refused unless `force=True`.
"""

from __future__ import annotations

import json
import os
import warnings
from importlib import metadata
from pathlib import Path

import torch

from residscope.common.atomic import atomic_dir, check_output_dir

from .checkpoint import local_to_hf
from .families import family_of
from .hf_config import SUBLAYER_KEY  # the loader reads what this module writes
from .errors import InputError

PRUNING_FILE = "residscope_pruning.json"


def versions() -> dict[str, str]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {name: version(name) for name in ("residscope", "torch", "transformers")}


def hf_config_of(model) -> dict:
    """The config.json dict of `model`: its source config with the current layer count, layer types and dtype."""
    cfg = model.cfg
    if not cfg.hf_config:
        raise InputError("model.cfg.hf_config is empty: this model has no source config.json to export")
    family = family_of(cfg.model_type)
    out = dict(cfg.hf_config)
    out[family.keys["num_hidden_layers"]] = cfg.n_layers
    if "layer_types" in out:
        # explicit per-layer types: derived patterns (max_window_layers, sliding_window_pattern) would shift after removal
        out["layer_types"] = list(cfg.layer_types)
    if family.export_config is not None:
        out = family.export_config(out, cfg)
    dtype = str(model.dtype).removeprefix("torch.")
    out["dtype"] = dtype
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype
    if bool(out.get("tie_word_embeddings", cfg.model_type == "gemma3_text")) != cfg.tie_embeddings:
        out["tie_word_embeddings"] = cfg.tie_embeddings  # untied at load (model/tying.py): lm_head is exported
    out.pop(SUBLAYER_KEY, None)
    sub = removed_sublayers(model)
    if sub["attn"] or sub["mlp"]:
        out[SUBLAYER_KEY] = sub
    return out


def removed_sublayers(model) -> dict[str, list[int]]:
    """Current indices of blocks whose attention or MLP half was removed: {"attn": [...], "mlp": [...]}."""
    return {"attn": list(model.cfg.removed_attn), "mlp": list(model.cfg.removed_mlp)}


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Tensors under Hugging Face names, contiguous, on the CPU (tied unembedding left out, as transformers expects)."""
    state = local_to_hf(model.state_dict(), model.cfg)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def check_target(out_dir: Path, force: bool, model=None) -> None:
    """Refuse an output folder that is a file, not empty (unless `force`), not writable, or that is, contains or lies
    inside the checkpoint `model` was loaded from (even with `force`: an offloaded model still reads it), before any
    work."""
    from .registry import source_paths

    inputs = [*source_paths(model.source), getattr(model, "source_folder", None)] if model is not None and model.source else []
    check_output_dir(out_dir, "out", force=force, inputs=inputs)


def save_pretrained(model, out_dir: str | os.PathLike, *, pruning_info: dict | None = None, force: bool = False) -> Path:
    """Write `model` to `out_dir` as described in the module docstring; returns the folder.

    pruning_info: extra fields for residscope_pruning.json (e.g. `pruning_record(...)`); the removed layers, layer
    origin, removed sub-layers and versions are always recorded.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir).expanduser()
    check_target(out_dir, force, model)
    config = hf_config_of(model)
    origin = list(model.layer_origin)
    record = {
        **(pruning_info or {}),
        "n_layers_before": model.n_layers_original,
        "n_layers_after": model.cfg.n_layers,
        "kept_layers": origin,
        "removed_sublayers": removed_sublayers(model),
        "source_model": model.source,
        "versions": versions(),
    }
    record.setdefault("removed_layers", [i for i in range(record["n_layers_before"]) if i not in origin])
    if SUBLAYER_KEY in config:
        record[SUBLAYER_KEY] = config[SUBLAYER_KEY]
        warnings.warn(
            f"{out_dir}: removed attention/MLP halves {config[SUBLAYER_KEY]} cannot be expressed in a transformers config; "
            "saved in residscope's own format (transformers would re-initialise the missing tensors at random)",
            UserWarning, stacklevel=2,
        )

    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if model.offload is not None:  # blocks on disk: copy the kept ones, one tensor at a time
            from .streamed_export import write_kept_tensors

            write_kept_tensors(model, tmp)
        else:
            save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
        (tmp / PRUNING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir
