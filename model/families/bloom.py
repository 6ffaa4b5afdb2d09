"""BLOOM: ALiBi (slopes for any head count: the closest power of two's, then every other slope of the next one's), a
LayerNorm on the embeddings before the first block, q/k/v fused per head in `query_key_value` ([head, (q, k, v), d_head]
rows), a plain tanh-GELU MLP, tied lm_head. Trained without a BOS token in front (TransformerLens's
default_prepend_bos=False)."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Family, WeightMap, megatron_block, with_bias

KEYS = {"hidden_size": "hidden_size", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
        "vocab_size": "vocab_size", "norm_eps": "layer_norm_epsilon", "max_position_embeddings": "seq_length"}
# BloomConfig.attribute_map, and the n_embed its __init__ takes for hidden_size (older BLOOM configs)
ALIASES = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "n_embed": "hidden_size"}


def read_config(cfg: dict, common: dict, source: str) -> dict:
    if cfg.get("apply_residual_connection_post_layernorm"):
        raise ConfigError(f"{source}: unsupported option apply_residual_connection_post_layernorm=True")
    if cfg.get("pretraining_tp", 1) != 1 and cfg.get("slow_but_exact"):
        # pretraining_tp alone changes nothing; with slow_but_exact the output projections are summed in slices
        raise ConfigError(f"{source}: unsupported option slow_but_exact=True (with pretraining_tp={cfg['pretraining_tp']})")
    return dict(common, act="gelu_tanh", mlp="plain", norm="layer", qkv_bias=True, o_bias=True, mlp_bias=True,
                d_mlp=4 * common["d_model"], embed_norm=True, positional="alibi", rope={},
                # ALiBi has no table to outgrow: n_ctx is the training length, as TransformerLens reads it (seq_length, else 2048)
                max_position_embeddings=common["max_position_embeddings"] or 2048)


def weights(cfg) -> WeightMap:
    return WeightMap(
        layer_prefix="transformer.h.{i}.",
        base_prefix="transformer.",
        top={"transformer.word_embeddings.weight": "embed.weight",
             **with_bias("transformer.word_embeddings_layernorm", "ln_embed"), **with_bias("transformer.ln_f", "ln_final"),
             "lm_head.weight": "unembed.weight"},
        block=megatron_block("self_attention"),
    )


FAMILY = Family(model_type="bloom", architecture="BloomForCausalLM", read_config=read_config, weights=weights,
                keys=KEYS, aliases=ALIASES, prepend_bos=False, tie_default=True, accepts=("pretraining_tp",), gguf_arch="bloom")
