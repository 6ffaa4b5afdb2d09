"""Llama (Llama 2 / 3, SmolLM2, TinyLlama, ...): the reference layout the other families describe themselves against.

Pre-norm RMSNorm blocks, RoPE on every layer (rotate_half), SwiGLU MLP, GQA, optional attention / MLP biases.
"""

from __future__ import annotations

from ..hf_config import llama_layout
from .base import Family, Packed, WeightMap

ROTARY_BUFFERS = (r"(^|\.)rotary_emb\.inv_freq$", r"\.self_attn\.rotary_emb\.")

ATTENTION = {f"self_attn.{n}_proj.{p}": f"attn.{n}_proj.{p}" for n in "qkvo" for p in ("weight", "bias")}
ATTENTION.update({"self_attn.q_norm.weight": "attn.q_norm.weight", "self_attn.k_norm.weight": "attn.k_norm.weight"})
GATED_MLP = {f"mlp.{n}_proj.{p}": f"mlp.{n}_proj.{p}" for n in ("gate", "up", "down") for p in ("weight", "bias")}
PRE_NORMS = {"input_layernorm.weight": "ln1.weight", "post_attention_layernorm.weight": "ln2.weight"}
TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "ln_final.weight", "lm_head.weight": "unembed.weight"}


def llama_weights(cfg, *, block: dict | None = None, top: dict | None = None, ignored: tuple = ()) -> WeightMap:
    """Llama's names, with a family's own block / top entries added (or replacing Llama's)."""
    return WeightMap(layer_prefix="model.layers.{i}.", top={**TOP, **(top or {})},
                     block={**ATTENTION, **GATED_MLP, **PRE_NORMS, **(block or {})},
                     ignored=ROTARY_BUFFERS + ignored)


FUSED_QKV = Packed(("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"))  # rows [q; k; v]
FUSED_GATE_UP = Packed(("mlp.gate_proj.weight", "mlp.up_proj.weight"))  # rows [gate; up]

FAMILY = Family(model_type="llama", architecture="LlamaForCausalLM", read_config=llama_layout, weights=llama_weights,
                gguf_arch="llama")
