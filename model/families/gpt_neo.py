"""GPT-Neo: GPT-2's layout with learned positions, separate q/k/v without biases, attention computed in float32 WITHOUT
the 1/sqrt(d_head) scaling, and layers alternating global and local attention (`attention_types`): a local layer's query
i sees keys i - window_size < j <= i (transformers' mask: tril(ones) xor tril(ones, -window_size))."""

from __future__ import annotations

from ..errors import ConfigError
from ..hf_config import FULL, SLIDING, activation, positive_int
from .base import Family, WeightMap, with_bias
from .gpt2 import gpt2_weight_map

KEYS = {"hidden_size": "hidden_size", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
        "intermediate_size": "intermediate_size", "vocab_size": "vocab_size", "norm_eps": "layer_norm_epsilon",
        "max_position_embeddings": "max_position_embeddings"}
ALIASES = {"num_attention_heads": "num_heads", "num_hidden_layers": "num_layers"}  # GPTNeoConfig.attribute_map


def layer_types(cfg: dict, n_layers: int, source: str) -> list[str]:
    """The kind of each layer as GPTNeoConfig ends up with it: `attention_layers` when config.json lists it (saved
    configs do; it is set after, and so wins over, the expansion of attention_types), else
    expand_attention_types_params: [[["global", "local"], 12]] -> global, local, global, ..."""
    key = "attention_layers" if cfg.get("attention_layers") is not None else "attention_types"
    kinds = cfg.get("attention_layers")
    if kinds is None:
        kinds = []
        try:
            for pattern, repeat in cfg.get("attention_types") or [[["global", "local"], 12]]:
                kinds += list(pattern) * repeat
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: attention_types must be a list of [[kinds...], repeat] pairs") from None
    if not isinstance(kinds, list) or len(kinds) != n_layers or not set(kinds) <= {"global", "local"}:
        raise ConfigError(f"{source}: {key} names {len(kinds) if isinstance(kinds, list) else kinds!r} layers of kinds "
                          f"global / local, the model has {n_layers}")
    return [SLIDING if k == "local" else FULL for k in kinds]


def read_config(cfg: dict, common: dict, source: str) -> dict:
    types = layer_types(cfg, common["n_layers"], source)
    return dict(common, act=activation(cfg, source, "activation_function", "gelu_new"), mlp="plain", norm="layer",
                qkv_bias=False, o_bias=True, mlp_bias=True, positional="learned", rope={}, layer_types=types,
                sliding_window=positive_int(cfg, "window_size", source, 256), attn_multiplier=1.0, attn_fp32=True)


def weights(cfg) -> WeightMap:
    return gpt2_weight_map({
        **{f"attn.attention.{n}_proj.weight": f"attn.{n}_proj.weight" for n in ("q", "k", "v")},
        **with_bias("attn.attention.out_proj", "attn.o_proj"),
        **with_bias("mlp.c_fc", "mlp.up_proj"), **with_bias("mlp.c_proj", "mlp.down_proj"),
    }, ignored=(r"\.attn\.attention\.bias$", r"\.attn\.attention\.masked_bias$"))


def export_config(out: dict, cfg) -> dict:
    """attention_types and attention_layers of the kept layers (the pattern would shift after removal)."""
    kinds = ["local" if t == SLIDING else "global" for t in cfg.layer_types]
    out["attention_types"] = [[[kind], 1] for kind in kinds]
    out["attention_layers"] = kinds
    return out


FAMILY = Family(model_type="gpt_neo", architecture="GPTNeoForCausalLM", read_config=read_config, weights=weights,
                keys=KEYS, aliases=ALIASES, tie_default=True, export_config=export_config)
