"""Tensor names: Hugging Face checkpoint keys <-> residscope parameter names, in both directions.

Loading and export share this one table, so a model exported after surgery uses exactly the names it was loaded with.
"""

from __future__ import annotations

import re

import torch

from .config import DecoderConfig

# Hugging Face suffix inside `model.layers.{i}.` -> residscope suffix inside `blocks.{i}.`
_BLOCK_NAMES = {
    "input_layernorm.weight": "ln1.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.q_proj.bias": "attn.q_proj.bias",
    "self_attn.k_proj.bias": "attn.k_proj.bias",
    "self_attn.v_proj.bias": "attn.v_proj.bias",
    "self_attn.o_proj.bias": "attn.o_proj.bias",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "mlp.gate_proj.bias": "mlp.gate_proj.bias",
    "mlp.up_proj.bias": "mlp.up_proj.bias",
    "mlp.down_proj.bias": "mlp.down_proj.bias",
}
# Norm names differ between the two-norm (Llama) and four-norm (Gemma 3) layouts.
_TWO_NORMS = {"post_attention_layernorm.weight": "ln2.weight"}
_FOUR_NORMS = {
    "post_attention_layernorm.weight": "ln1_post.weight",
    "pre_feedforward_layernorm.weight": "ln2.weight",
    "post_feedforward_layernorm.weight": "ln2_post.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "ln_final.weight", "lm_head.weight": "unembed.weight"}
# Buffers some checkpoints carry that hold nothing the model needs.
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|\.self_attn\.rotary_emb\.|^model\.embed_tokens\.embed_scale$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def block_names(cfg: DecoderConfig) -> dict[str, str]:
    return {**_BLOCK_NAMES, **(_FOUR_NORMS if cfg.post_norms else _TWO_NORMS)}


def local_names(key: str, cfg: DecoderConfig) -> list[str]:
    """Local parameter names for one checkpoint key: [] for ignorable buffers, several when the checkpoint fuses
    tensors (Baichuan's W_pack = rows [q; k; v], split in that order along dim 0). KeyError for unknown keys."""
    if IGNORED.search(key):
        return []
    if key in _TOP_NAMES:
        return [_TOP_NAMES[key]]
    m = _LAYER.match(key)
    if m:
        layer, suffix = m.group(1), m.group(2)
        if suffix == "self_attn.W_pack.weight":
            return [f"blocks.{layer}.attn.{n}_proj.weight" for n in "qkv"]
        names = block_names(cfg)
        if suffix in names:
            return [f"blocks.{layer}.{names[suffix]}"]
    raise KeyError(key)


def hf_to_local(key: str, tensor: torch.Tensor, cfg: DecoderConfig) -> list[tuple[str, torch.Tensor]]:
    """Local (name, tensor) pairs for one checkpoint tensor (fused tensors split)."""
    names = local_names(key, cfg)
    if len(names) <= 1:
        return [(n, tensor) for n in names]
    return list(zip(names, tensor.chunk(len(names), dim=0)))


def local_to_hf(state: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Hugging Face state dict from a residscope state dict (Baichuan's q/k/v fused back into W_pack)."""
    inverse_blocks = {v: k for k, v in block_names(cfg).items()}
    inverse_top = {v: k for k, v in _TOP_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in inverse_top:
            if name == "unembed.weight" and cfg.tie_embeddings:
                continue
            out[inverse_top[name]] = tensor
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
        if not m or m.group(2) not in inverse_blocks:
            raise KeyError(f"no Hugging Face name for parameter {name!r}")
        out[f"model.layers.{m.group(1)}.{inverse_blocks[m.group(2)]}"] = tensor
    if cfg.model_type == "baichuan":
        for layer in range(cfg.n_layers):
            names = [f"model.layers.{layer}.self_attn.{n}_proj.weight" for n in "qkv"]
            if all(n in out for n in names):  # a block whose attention was removed has nothing to fuse
                out[f"model.layers.{layer}.self_attn.W_pack.weight"] = torch.cat([out.pop(n) for n in names], dim=0)
    return out
