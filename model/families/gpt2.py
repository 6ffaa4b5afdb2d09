"""GPT-2 (and its many fine-tunes): learned absolute positions (wpe), LayerNorm with bias, Conv1D weights stored
[in, out] (q, k, v fused along the output), a plain GELU MLP (gelu_new), tied lm_head. Trained with `<|endoftext|>` as
BOS and no BOS added by its tokenizer: TransformerLens prepends it by default, and so do we."""

from __future__ import annotations

from ..errors import ConfigError
from ..hf_config import activation
from .base import QKV, Family, Packed, WeightMap, with_bias

KEYS = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
        "intermediate_size": "n_inner", "vocab_size": "vocab_size", "norm_eps": "layer_norm_epsilon",
        "max_position_embeddings": "n_positions"}
ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions", "num_attention_heads": "n_head",
           "num_hidden_layers": "n_layer"}  # GPT2Config.attribute_map (GPTJConfig's too)


def read_config(cfg: dict, common: dict, source: str) -> dict:
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        raise ConfigError(f"{source}: unsupported option scale_attn_by_inverse_layer_idx=True")
    if cfg.get("add_cross_attention"):
        raise ConfigError(f"{source}: unsupported option add_cross_attention=True (an encoder-decoder GPT-2)")
    return dict(common, act=activation(cfg, source, "activation_function", "gelu_new"), mlp="plain", norm="layer",
                qkv_bias=True, o_bias=True, mlp_bias=True, positional="learned", rope={},
                # scale_attn_weights=False: scores are not divided by sqrt(d_head)
                attn_multiplier=None if cfg.get("scale_attn_weights", True) else 1.0,
                # reorder_and_upcast_attn changes only the precision: q·k and softmax in float32 (half-precision models)
                attn_fp32=bool(cfg.get("reorder_and_upcast_attn", False)))


def gpt2_weight_map(block: dict, ignored: tuple[str, ...]) -> WeightMap:
    """GPT-2's checkpoint layout, which GPT-Neo shares: its top-level tensors and block LayerNorms, plus `block`'s
    attention and MLP names."""
    return WeightMap(
        layer_prefix="transformer.h.{i}.",
        base_prefix="transformer.",
        top={"transformer.wte.weight": "embed.weight", "transformer.wpe.weight": "pos_embed.weight",
             **with_bias("transformer.ln_f", "ln_final"), "lm_head.weight": "unembed.weight"},
        block={**with_bias("ln_1", "ln1"), **with_bias("ln_2", "ln2"), **block},
        ignored=ignored,
    )


def weights(cfg) -> WeightMap:
    conv = lambda name: Packed((name,), transpose=True)  # noqa: E731 - Conv1D: [in, out]
    return gpt2_weight_map({
        "attn.c_attn.weight": Packed(tuple(f"{n}.weight" for n in QKV), transpose=True),
        "attn.c_attn.bias": Packed(tuple(f"{n}.bias" for n in QKV)),
        "attn.c_proj.weight": conv("attn.o_proj.weight"), "attn.c_proj.bias": "attn.o_proj.bias",
        "mlp.c_fc.weight": conv("mlp.up_proj.weight"), "mlp.c_fc.bias": "mlp.up_proj.bias",
        "mlp.c_proj.weight": conv("mlp.down_proj.weight"), "mlp.c_proj.bias": "mlp.down_proj.bias",
    }, ignored=(r"\.attn\.bias$", r"\.attn\.masked_bias$"))  # causal-mask buffers of older checkpoints


FAMILY = Family(model_type="gpt2", architecture="GPT2LMHeadModel", read_config=read_config, weights=weights,
                keys=KEYS, aliases=ALIASES, tie_default=True, gguf_arch="gpt2")
