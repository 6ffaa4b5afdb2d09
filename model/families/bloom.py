"""BLOOM: ALiBi (slopes for any head count: the closest power of two's, then every other slope of the next one's), a
LayerNorm on the embeddings before the first block, q/k/v fused per head in `query_key_value` ([head, (q, k, v), d_head]
rows), a plain tanh-GELU MLP, tied lm_head. Trained without a BOS token in front (TransformerLens's
default_prepend_bos=False)."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Family, Packed, WeightMap

KEYS = {"hidden_size": "hidden_size", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
        "vocab_size": "vocab_size", "norm_eps": "layer_norm_epsilon", "max_position_embeddings": "seq_length"}


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
    qkv = ("attn.q_proj", "attn.k_proj", "attn.v_proj")
    return WeightMap(
        layer_prefix="transformer.h.{i}.",
        base_prefix="transformer.",
        top={"transformer.word_embeddings.weight": "embed.weight",
             "transformer.word_embeddings_layernorm.weight": "ln_embed.weight",
             "transformer.word_embeddings_layernorm.bias": "ln_embed.bias",
             "transformer.ln_f.weight": "ln_final.weight", "transformer.ln_f.bias": "ln_final.bias",
             "lm_head.weight": "unembed.weight"},
        block={
            "input_layernorm.weight": "ln1.weight", "input_layernorm.bias": "ln1.bias",
            "post_attention_layernorm.weight": "ln2.weight", "post_attention_layernorm.bias": "ln2.bias",
            "self_attention.query_key_value.weight": Packed(tuple(f"{n}.weight" for n in qkv), layout="heads"),
            "self_attention.query_key_value.bias": Packed(tuple(f"{n}.bias" for n in qkv), layout="heads"),
            "self_attention.dense.weight": "attn.o_proj.weight", "self_attention.dense.bias": "attn.o_proj.bias",
            "mlp.dense_h_to_4h.weight": "mlp.up_proj.weight", "mlp.dense_h_to_4h.bias": "mlp.up_proj.bias",
            "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight", "mlp.dense_4h_to_h.bias": "mlp.down_proj.bias",
        },
    )


FAMILY = Family(model_type="bloom", architecture="BloomForCausalLM", read_config=read_config, weights=weights,
                keys=KEYS, prepend_bos=False, tie_default=True, accepts=("pretraining_tp",), gguf_arch="bloom")
