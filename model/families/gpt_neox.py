"""GPT-NeoX (Pythia, the interpretability community's model suite; GPT-NeoX-20B): LayerNorm, partial rotary
(`rotary_pct`, rotate_half over the first rotary dims of each head), attention and MLP in parallel off the block input
(`use_parallel_residual`, else serial), q/k/v fused per head in `query_key_value` ([head, (q, k, v), d_head] rows), a
plain GELU MLP, untied `embed_out`. Trained without a BOS token in front (TransformerLens's default_prepend_bos=False)."""

from __future__ import annotations

from ..hf_config import FULL, activation, rope_params
from .base import Family, WeightMap, megatron_block, with_bias

KEYS = {"hidden_size": "hidden_size", "num_hidden_layers": "num_hidden_layers",
        "num_attention_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
        "vocab_size": "vocab_size", "norm_eps": "layer_norm_eps", "max_position_embeddings": "max_position_embeddings"}


def rope_block(cfg: dict) -> dict:
    """GPTNeoXConfig's RoPE: rope_parameters (transformers 5), else rope_scaling + the legacy rotary_emb_base and
    rotary_pct keys (Pythia's config.json); transformers' defaults: theta 10000, a quarter of each head rotated."""
    block = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    block.setdefault("rope_theta", cfg.get("rotary_emb_base", 10000.0))
    block.setdefault("partial_rotary_factor", cfg.get("rotary_pct", 0.25))
    return block


def read_config(cfg: dict, common: dict, source: str) -> dict:
    block = rope_block(cfg)
    partial = block.pop("partial_rotary_factor")
    bias = bool(cfg.get("attention_bias", True))
    return dict(common, act=activation(cfg, source, "hidden_act", "gelu"), mlp="plain", norm="layer",
                qkv_bias=bias, o_bias=bias, mlp_bias=True, parallel=bool(cfg.get("use_parallel_residual", True)),
                positional="rope",
                rope={FULL: rope_params(cfg, source, common["max_position_embeddings"], block=block, partial=partial)})


def weights(cfg) -> WeightMap:
    return WeightMap(
        layer_prefix="gpt_neox.layers.{i}.",
        base_prefix="gpt_neox.",
        # transformers 5 names the head lm_head; Pythia's checkpoints say embed_out (export writes lm_head)
        top={"gpt_neox.embed_in.weight": "embed.weight", **with_bias("gpt_neox.final_layer_norm", "ln_final"),
             "lm_head.weight": "unembed.weight", "embed_out.weight": "unembed.weight"},
        block=megatron_block("attention"),
        # causal-mask buffers and rotary inv_freq of older checkpoints
        ignored=(r"\.attention\.bias$", r"\.attention\.masked_bias$", r"rotary_emb\.inv_freq$"),
    )


FAMILY = Family(model_type="gpt_neox", architecture="GPTNeoXForCausalLM", read_config=read_config, weights=weights,
                keys=KEYS, prepend_bos=False, gguf_arch="gptneox")
