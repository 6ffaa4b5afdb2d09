"""OPT: learned positions read at row p + 2 (OPTLearnedPositionalEmbedding's offset), LayerNorm before each half
(`do_layer_norm_before`, most sizes) or after each residual add (OPT-350m: post-LN, and then no final norm), a plain
ReLU MLP (fc1 / fc2), and for OPT-350m embeddings narrower than the stream (`word_embed_proj_dim`) projected in
(`project_in`) and out before the tied lm_head (`project_out`)."""

from __future__ import annotations

from ..hf_config import activation, positive_int
from .base import Family, WeightMap

KEYS = {"hidden_size": "hidden_size", "num_hidden_layers": "num_hidden_layers",
        "num_attention_heads": "num_attention_heads", "intermediate_size": "ffn_dim", "vocab_size": "vocab_size",
        "norm_eps": "layer_norm_eps", "max_position_embeddings": "max_position_embeddings"}


def read_config(cfg: dict, common: dict, source: str) -> dict:
    pre_norm = bool(cfg.get("do_layer_norm_before", True))
    d_embed = positive_int(cfg, "word_embed_proj_dim", source, common["d_model"])
    bias = bool(cfg.get("enable_bias", True))
    return dict(common, act=activation(cfg, source, "activation_function", "relu"), mlp="plain", norm="layer",
                norm_eps=1e-5,  # OPT's nn.LayerNorms use torch's default eps; the config has no key for it
                qkv_bias=bias, o_bias=bias, mlp_bias=bias, positional="learned", rope={}, pos_offset=2,
                residual_norm=not pre_norm, norm_affine=bool(cfg.get("layer_norm_elementwise_affine", True)),
                final_norm=pre_norm and not cfg.get("_remove_final_layer_norm", False),
                d_embed=d_embed if d_embed != common["d_model"] else None)


def weights(cfg) -> WeightMap:
    return WeightMap(
        layer_prefix="model.decoder.layers.{i}.",
        base_prefix="model.",
        top={"model.decoder.embed_tokens.weight": "embed.weight", "model.decoder.embed_positions.weight": "pos_embed.weight",
             "model.decoder.final_layer_norm.weight": "ln_final.weight", "model.decoder.final_layer_norm.bias": "ln_final.bias",
             "model.decoder.project_in.weight": "embed_proj.weight", "model.decoder.project_out.weight": "unembed.proj.weight",
             "lm_head.weight": "unembed.weight"},
        block={
            **{f"self_attn.{n}_proj.{p}": f"attn.{n}_proj.{p}" for n in ("q", "k", "v") for p in ("weight", "bias")},
            "self_attn.out_proj.weight": "attn.o_proj.weight", "self_attn.out_proj.bias": "attn.o_proj.bias",
            "self_attn_layer_norm.weight": "ln1.weight", "self_attn_layer_norm.bias": "ln1.bias",
            "final_layer_norm.weight": "ln2.weight", "final_layer_norm.bias": "ln2.bias",
            "fc1.weight": "mlp.up_proj.weight", "fc1.bias": "mlp.up_proj.bias",
            "fc2.weight": "mlp.down_proj.weight", "fc2.bias": "mlp.down_proj.bias",
        },
    )


FAMILY = Family(model_type="opt", architecture="OPTForCausalLM", read_config=read_config, weights=weights, keys=KEYS,
                tie_default=True)
