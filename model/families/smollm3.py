"""SmolLM3: Llama with NoPE layers. `no_rope_layers[i]` is 1 where layer i applies RoPE and 0 where it applies no
rotary position at all (by default every `no_rope_layer_interval`-th layer, 4); positional analyses see those layers as
None in `model.rope_settings()`. Sliding layers follow `layer_types` (by default the NoPE layers slide when
`use_sliding_window` is set). Trained without a BOS token in front (TransformerLens's default_prepend_bos=False)."""

from __future__ import annotations

from ..errors import ConfigError
from ..hf_config import FULL, SLIDING, positive_int, rope_params
from .base import Family
from .llama import llama_weights


def rope_flags(cfg: dict, n_layers: int, source: str) -> list[int]:
    """no_rope_layers as given (1 = RoPE, 0 = NoPE), else SmolLM3Config's default pattern."""
    flags = cfg.get("no_rope_layers")
    if flags is None:
        interval = positive_int(cfg, "no_rope_layer_interval", source, 4)
        return [int((i + 1) % interval != 0) for i in range(n_layers)]
    if not isinstance(flags, list) or len(flags) != n_layers or any(f not in (0, 1) or isinstance(f, float) for f in flags):
        raise ConfigError(f"{source}: no_rope_layers must list 0 or 1 for each of the {n_layers} layers, got {flags!r}")
    return [int(f) for f in flags]


def read_config(cfg: dict, common: dict, source: str) -> dict:
    n_layers = common["n_layers"]
    flags = rope_flags(cfg, n_layers, source)
    window = positive_int(cfg, "sliding_window", source)
    layer_types = cfg.get("layer_types") or [
        SLIDING if cfg.get("use_sliding_window") and window is not None and not flags[i] else FULL for i in range(n_layers)]
    bias = bool(cfg.get("attention_bias", False))
    return dict(common, qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)),
                layer_types=list(layer_types), sliding_window=window,
                no_rope=tuple(i for i, f in enumerate(flags) if not f),
                rope={t: rope_params(cfg, source, common["max_position_embeddings"]) for t in set(layer_types)})


def export_config(out: dict, cfg) -> dict:
    out["layer_types"] = list(cfg.layer_types)
    out["no_rope_layers"] = [0 if i in cfg.no_rope else 1 for i in range(cfg.n_layers)]  # the interval would shift
    return out


FAMILY = Family(model_type="smollm3", architecture="SmolLM3ForCausalLM", read_config=read_config, weights=llama_weights,
                prepend_bos=False, export_config=export_config, tie_default=True, gguf_arch="smollm3")
