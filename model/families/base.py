"""What a model family is, as data: how its config.json reads, and where its tensors lie in a checkpoint.

A `Family` (one per `model_type`, one file each in this folder) holds
- `read_config(config_json, common, source) -> dict`: the DecoderConfig fields this family adds to `common` (the fields
  every family shares, read by `hf_config.common_fields` through the family's `keys`);
- `keys`: where the shared fields live in this family's config.json (GPT-2 says `n_embd`, Llama `hidden_size`);
- `aliases`: other spellings transformers reads for a key (its config class's `attribute_map`, GPT-2's
  `hidden_size` for `n_embd`), so a config.json written with either loads;
- `weights(cfg) -> WeightMap`: Hugging Face tensor names <-> residscope parameter names, with fused tensors split
  (`Packed`) on load and fused again on export;
- `export_config(config_json, cfg) -> dict`: the config.json of a model after surgery (per-layer lists cut to the kept
  layers);
- TransformerLens facts: `architecture` and `prepend_bos`.
The decoder never asks which family it runs: everything a family changes is a DecoderConfig field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

# canonical DecoderConfig source key -> the config.json key most families use
LLAMA_KEYS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "head_dim": "head_dim",
}


@dataclass(frozen=True)
class Packed:
    """One checkpoint tensor holding several residscope parameters (or one, transposed).

    layout "rows": the parts are stacked along dim 0 in order, each as tall as its parameter (Phi-3's qkv_proj with GQA,
    Baichuan's W_pack, fused gate_up_proj); "heads": interleaved per head, [head, part, d_head, ...] (GPT-NeoX's and
    BLOOM's query_key_value). `transpose`: the checkpoint stores weights [in, out] (GPT-2's Conv1D), split along its
    last dim; biases (1-D) are never transposed.
    """

    parts: tuple[str, ...]
    layout: str = "rows"
    transpose: bool = False

    def split(self, tensor: torch.Tensor, shapes: list[torch.Size], n_heads: int) -> list[torch.Tensor]:
        """The parameters' values from the checkpoint tensor; `shapes` are the parameters' shapes (in `parts` order)."""
        if self.transpose and tensor.dim() == 2:
            tensor = tensor.T
        if self.layout == "heads":
            per_head = tensor.reshape(n_heads, len(self.parts), -1, *tensor.shape[1:])  # [head, part, d_head, ...]
            return [per_head[:, p].reshape(shape) for p, shape in enumerate(shapes)]
        return list(torch.split(tensor, [s[0] for s in shapes], dim=0))

    def merge(self, tensors: list[torch.Tensor], n_heads: int) -> torch.Tensor:
        """Inverse of `split`: the checkpoint tensor from the parameters' values."""
        if self.layout == "heads":
            per_head = [t.reshape(n_heads, -1, *t.shape[1:]) for t in tensors]  # [head, d_head, ...] each
            out = torch.stack(per_head, dim=1).reshape(-1, *tensors[0].shape[1:])
        else:
            out = torch.cat(tensors, dim=0)
        return out.T if self.transpose and out.dim() == 2 else out


QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")


def with_bias(checkpoint: str, ours: str) -> dict[str, str]:
    """A layer with a weight and a bias (LayerNorm, biased Linear): both tensors, checkpoint name -> residscope name."""
    return {f"{checkpoint}.{p}": f"{ours}.{p}" for p in ("weight", "bias")}


def qkv_per_head(checkpoint: str) -> dict[str, Packed]:
    """q, k and v fused per head in one tensor and its bias, rows [head, (q, k, v), d_head] (GPT-NeoX's and BLOOM's
    query_key_value, from Megatron-LM)."""
    return {f"{checkpoint}.{p}": Packed(tuple(f"{n}.{p}" for n in QKV), layout="heads") for p in ("weight", "bias")}


def megatron_block(attention: str) -> dict[str, str | Packed]:
    """A block as Megatron-LM's descendants (BLOOM, GPT-NeoX) name it, every layer biased: input / post-attention
    LayerNorms, `{attention}.query_key_value` fused per head, `{attention}.dense` out, dense_h_to_4h / dense_4h_to_h."""
    return {**with_bias("input_layernorm", "ln1"), **with_bias("post_attention_layernorm", "ln2"),
            **qkv_per_head(f"{attention}.query_key_value"), **with_bias(f"{attention}.dense", "attn.o_proj"),
            **with_bias("mlp.dense_h_to_4h", "mlp.up_proj"), **with_bias("mlp.dense_4h_to_h", "mlp.down_proj")}


@dataclass(frozen=True)
class WeightMap:
    """Checkpoint names of one model: `top` maps whole keys, `block` maps suffixes inside `layer_prefix` (with `{i}`),
    each to a residscope name (a suffix inside `blocks.{i}.` for blocks) or a `Packed`. `ignored`: regexes of
    buffers checkpoints carry that hold nothing the model needs (rotary inv_freq, causal-mask buffers). `base_prefix`:
    transformers' base_model_prefix ("transformer.", "model."); checkpoints saved from the bare model (openai-community/gpt2,
    facebook/opt-125m, bigscience/bloom-560m) name their tensors without it, and transformers loads both."""

    layer_prefix: str
    top: dict[str, str | Packed]
    block: dict[str, str | Packed]
    ignored: tuple[str, ...] = ()
    base_prefix: str = ""
    _layer_re: re.Pattern = field(init=False, repr=False, compare=False)
    _ignored_re: re.Pattern | None = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_layer_re", re.compile("^" + re.escape(self.layer_prefix).replace(r"\{i\}", r"(\d+)") + "(.+)$"))
        object.__setattr__(self, "_ignored_re", re.compile("|".join(f"(?:{p})" for p in self.ignored)) if self.ignored else None)

    def rule(self, key: str) -> tuple[int | None, str | Packed] | None:
        """(layer or None, rule) for a checkpoint key; None for an ignorable buffer. KeyError for an unknown key."""
        if self._ignored_re is not None and self._ignored_re.search(key):
            return None
        key = self.canonical(key)
        if key in self.top:
            return None, self.top[key]
        m = self._layer_re.match(key)
        if m and m.group(2) in self.block:
            return int(m.group(1)), self.block[m.group(2)]
        raise KeyError(key)

    def canonical(self, key: str) -> str:
        """`key` as this map names it: with the base-model prefix put back when the checkpoint left it out."""
        if not self.base_prefix or key in self.top or self._layer_re.match(key) or key.startswith(self.base_prefix):
            return key
        return self.base_prefix + key

    def layer_key(self, layer: int, suffix: str) -> str:
        return self.layer_prefix.replace("{i}", str(layer)) + suffix

    def layer_of(self, key: str) -> tuple[int, str] | None:
        """(layer, suffix) of a block tensor's checkpoint key, None for a top-level one."""
        m = self._layer_re.match(self.canonical(key))
        return (int(m.group(1)), m.group(2)) if m else None


def local_parts(layer: int | None, rule: str | Packed) -> list[str]:
    """The residscope parameter names a rule fills."""
    parts = rule.parts if isinstance(rule, Packed) else (rule,)
    return [p if layer is None else f"blocks.{layer}.{p}" for p in parts]


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the class name transformers' config.json lists in "architectures"
    read_config: Callable[[dict, dict, str], dict]
    weights: Callable[..., WeightMap]
    keys: dict[str, str] = field(default_factory=lambda: dict(LLAMA_KEYS))
    prepend_bos: bool = True  # TransformerLens's default_prepend_bos for the family
    export_config: Callable[[dict, object], dict] | None = None
    tie_default: bool = False  # tie_word_embeddings when config.json does not say
    gguf_arch: str | None = None  # llama.cpp's general.architecture for this family
    accepts: tuple[str, ...] = ()  # keys of hf_config's generic refusal list this family reads (and refuses) itself
    quantization_note: str | None = None  # the refusal of a quantization_config says this instead of the generic advice
    # config.json spelling -> the key this family reads under it (transformers' attribute_map, either direction)
    aliases: dict[str, str] = field(default_factory=dict)
