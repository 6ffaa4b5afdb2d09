"""A (pruned) Decoder -> one GGUF file that llama.cpp runs, written with the `gguf` package's writer.

What llama.cpp's `convert_hf_to_gguf.py` does for the llama architecture (LlamaModel), mirrored here:
- metadata: `general.architecture = llama`, `llama.block_count`, `llama.context_length`, `llama.embedding_length`,
  `llama.feed_forward_length`, `llama.attention.head_count(_kv)`, `llama.attention.layer_norm_rms_epsilon`,
  `llama.rope.freq_base`, `llama.rope.dimension_count`, `llama.vocab_size`, `general.file_type`,
  `general.quantization_version`;
- tensor names: `token_embd`, `output_norm`, `output` (only when not tied), `blk.{i}.attn_norm|attn_q|attn_k|attn_v|
  attn_output|ffn_norm|ffn_gate|ffn_up|ffn_down`;
- the q/k row permutation: llama.cpp applies RoPE to interleaved pairs (x0, x1), (x2, x3), ... while Hugging Face Llama
  rotates the two halves of each head, so the rows of q_proj / k_proj are reordered per head from [half0; half1] to
  pairs (`permute_qk`); transformers' GGUF reader (and thus residscope's loader) undoes it;
- the tokenizer: `tokenizer.ggml.model = gpt2` (byte-level BPE), the tokens in id order with their types (NORMAL,
  CONTROL for special added tokens, USER_DEFINED for other added tokens, UNUSED for ids the tokenizer lacks), the BPE
  merges, BOS/EOS/UNK/PAD ids, `add_bos_token` and the chat template (`gguf.SpecialVocab`, the class convert uses).
  `tokenizer.ggml.pre` names the pre-tokenizer; llama.cpp identifies it by a hash of test tokenizations, we read it off
  the tokenizer's own description (`pre_tokenizer_name`): the file then splits text exactly as residscope's tokenizer.

Quantization (`--quant`): norms and other 1-D tensors stay float32, as in llama.cpp. f16 stores the matrices as float16;
q8_0 and q4_0 quantize them in blocks of 32 with `gguf.quants` (numpy, bit-identical to ggml's reference quantizer).
For q4_0 the output matrix (the embedding when tied) is stored as q8_0, following llama-quantize's rule of keeping the
output at higher precision (it uses q6_K, which `gguf.quants` cannot write). A matrix whose rows are not a multiple of
32 falls back to float16, as in convert_hf_to_gguf.

Pruned models: the blocks that remain, numbered 0..n-1, with `llama.block_count = n`; provenance in `residscope.*`
keys that llama.cpp ignores (original layer of each block, removed layers). Sub-block pruning (an attention or MLP half
removed) has no llama.cpp expression except zero weights: a removed half is written with all-zero tensors (its norm kept when the model kept it), which
contribute exactly nothing to the residual stream (the output projection o_proj / down_proj is 0), so the file computes the same function at the cost of the unpruned half's size and compute.

The file is written to a temp name beside the target and renamed (`atomic_write`); an existing target is refused
unless `force`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from residscope.common.atomic import atomic_write, check_output_file

from .errors import InputError

QUANTS = ("f32", "f16", "q8_0", "q4_0")
ARCHITECTURES = ("llama", "mistral")  # transformers model types llama.cpp runs as `llama` (convert's LlamaModel)
_BLOCK = 32  # q8_0 / q4_0 block size along a row

# Hugging Face name (inside model.layers.{i}.) -> GGUF name (inside blk.{i}.), as gguf.constants' tensor map for llama
_BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
_ATTN_PARTS = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
               "self_attn.v_proj.weight", "self_attn.o_proj.weight")
_MLP_PARTS = ("post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
# (the last name of each is the output projection; a removed half keeps no projection, maybe its norm)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class GGUFExport:
    """What `write_gguf` wrote."""

    path: str
    quant: str
    n_layers: int
    n_tensors: int
    n_bytes: int
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type name -> number of tensors
    tokenizer_pre: str | None = None
    zeroed_sublayers: dict[str, list[int]] = field(default_factory=dict)  # halves written as zeros (sub-block pruning)

    def to_dict(self) -> dict:
        return asdict(self)


def check_quant(quant: str) -> str:
    """`quant` if GGUF export can write it, else InputError naming --quant."""
    if quant not in QUANTS:
        raise InputError(f"--quant must be one of {', '.join(QUANTS)}; got {quant!r}")
    return quant


def check_gguf_target(path: str | os.PathLike, *, force: bool = False, what: str = "--gguf") -> Path:
    """Refuse, before any work, a target that exists (without `force`), is a folder, or cannot be created."""
    path = check_output_file(path, what)
    if path.exists() and not force:
        raise InputError(f"{what}: {path} exists (pass --force to replace it)")
    return path


# ---- tensors --------------------------------------------------------------------------------------------------------

def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection [n_heads * d_head, ...] from Hugging Face's half-split RoPE layout to llama.cpp's
    interleaved pairs: per head, row order [0, d/2, 1, d/2 + 1, ...] (convert_hf_to_gguf's LlamaModel.permute)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])  # [head, half, d_head/2, ...]
            .swapaxes(1, 2)  # [head, d_head/2, half, ...]
            .reshape(w.shape))


def gguf_tensor_name(hf_name: str) -> str:
    """The llama.cpp name of a Hugging Face Llama tensor; InputError for a tensor llama.cpp's llama has no place for."""
    if hf_name in _TOP_TENSORS:
        return _TOP_TENSORS[hf_name]
    m = _LAYER.match(hf_name)
    if m and m.group(2) in _BLOCK_TENSORS:
        return f"blk.{m.group(1)}.{_BLOCK_TENSORS[m.group(2)]}"
    raise InputError(f"tensor {hf_name!r} has no place in llama.cpp's llama architecture")


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str, tied: bool) -> str:
    """The GGML type a tensor is stored as (see the module docstring)."""
    if len(shape) < 2 or quant == "f32":
        return "F32"
    if quant == "f16" or shape[-1] % _BLOCK:
        return "F16"
    is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    if quant == "q4_0" and is_output:
        return "Q8_0"
    return quant.upper()


def encode_tensor(t: torch.Tensor, ggml_type: str) -> tuple[np.ndarray, object]:
    """(numpy data, raw GGML type or None) for GGUFWriter.add_tensor; quantized types are packed bytes."""
    import gguf

    x = t.detach().to("cpu", torch.float32).numpy()
    if ggml_type == "F32":
        return x, None
    if ggml_type == "F16":
        return x.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[ggml_type]
    return gguf.quants.quantize(x, qtype), qtype


def filled_state(state: dict[str, torch.Tensor], hf: dict, n_layers: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict with removed attention / MLP halves as zero tensors of their shapes; and which halves those were."""
    d, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    n_kv = hf.get("num_key_value_heads") or n_heads
    d_head = hf.get("head_dim") or d // n_heads
    shapes = {"input_layernorm.weight": (d,), "self_attn.q_proj.weight": (n_heads * d_head, d),
              "self_attn.k_proj.weight": (n_kv * d_head, d), "self_attn.v_proj.weight": (n_kv * d_head, d),
              "self_attn.o_proj.weight": (d, n_heads * d_head), "post_attention_layernorm.weight": (d,),
              "mlp.gate_proj.weight": (hf["intermediate_size"], d), "mlp.up_proj.weight": (hf["intermediate_size"], d),
              "mlp.down_proj.weight": (d, hf["intermediate_size"])}
    out, zeroed = dict(state), {"attn": [], "mlp": []}
    for layer in range(n_layers):
        for part, names in (("attn", _ATTN_PARTS), ("mlp", _MLP_PARTS)):
            keys = [f"model.layers.{layer}.{n}" for n in names]
            if keys[-1] not in state:  # the output projection (o_proj / down_proj) marks a removed half
                zeroed[part].append(layer)
                for k, n in zip(keys, names):
                    if k not in state:
                        out[k] = torch.zeros(shapes[n])
    return out, zeroed


# ---- metadata -------------------------------------------------------------------------------------------------------

def check_exportable(hf: dict) -> None:
    """One line for a model llama.cpp's llama architecture cannot express."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        from .gguf_archs import ARCHS

        own = ", ".join(a.model_type for a in ARCHS.values())
        raise InputError(f"GGUF export supports {', '.join(ARCHITECTURES)} models (llama.cpp's llama architecture) and "
                         f"{own} (residscope's GGUF table); this model is {model_type!r}")
    if hf.get("mlp_bias"):
        raise InputError("GGUF export: llama.cpp's llama architecture has no MLP biases (mlp_bias=true)")
    if model_type == "mistral" and hf.get("sliding_window"):
        raise InputError(f"GGUF export: llama.cpp's llama architecture has no sliding window "
                         f"(sliding_window={hf['sliding_window']})")
    rope = rope_scaling(hf)
    if rope is not None and rope.get("rope_type", rope.get("type")) not in ("default", "linear"):
        raise InputError(f"GGUF export: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported "
                         "(default and linear are)")


def rope_scaling(hf: dict) -> dict | None:
    """The RoPE parameters of a config (transformers 5 `rope_parameters` or older `rope_scaling`), None when absent."""
    return hf.get("rope_parameters") or hf.get("rope_scaling")


def rope_theta(hf: dict) -> float:
    rope = rope_scaling(hf) or {}
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def add_llama_metadata(writer, hf: dict, *, n_layers: int, n_vocab: int, quant: str, name: str) -> None:
    import gguf

    n_heads = hf["num_attention_heads"]
    d_head = hf.get("head_dim") or hf["hidden_size"] // n_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(int(hf.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(hf.get("num_key_value_heads") or n_heads)
    writer.add_layer_norm_rms_eps(float(hf.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(rope_theta(hf))
    writer.add_rope_dimension_count(d_head)
    if d_head != hf["hidden_size"] // n_heads:
        writer.add_key_length(d_head)
        writer.add_value_length(d_head)
    rope = rope_scaling(hf) or {}
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    add_file_type(writer, quant)


def add_file_type(writer, quant: str) -> None:
    import gguf

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---- tokenizer ------------------------------------------------------------------------------------------------------

def tokenizer_description(tokenizer) -> dict:
    """The tokenizer.json content of a fast (Rust-backed) tokenizer; InputError for any other kind."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError(f"GGUF export needs a fast byte-level BPE tokenizer (tokenizer.json); this model has "
                         f"{type(tokenizer).__name__}")
    return json.loads(backend.to_str())


def pre_tokenizer_name(description: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer, from its tokenizer.json pre_tokenizer:
    ByteLevel with the GPT-2 regex -> "gpt-2" (llama.cpp's name: convert_hf_to_gguf writes it, llama-vocab reads it;
    "gpt2" is the tokenizer *model* name and an unknown pre-tokenizer); individual digits then ByteLevel -> "smollm"."""
    pre = description.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex", True)) for p in parts]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, True), ("ByteLevel", None, True)]:
        return "smollm"
    raise InputError(f"GGUF export: pre-tokenizer {json.dumps(pre)[:120]} has no llama.cpp name here "
                     "(supported: byte-level BPE with the GPT-2 regex, optionally with single digits first)")


def vocab_tokens(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens and token types in id order, as convert_hf_to_gguf's get_vocab_base."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if i in decoder and not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            types.append(gguf.TokenType.CONTROL if i in decoder and decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def add_tokenizer(writer, tokenizer, n_vocab: int, scratch: Path) -> str:
    """Tokenizer keys (see the module docstring); returns the pre-tokenizer name."""
    import gguf

    description = tokenizer_description(tokenizer)
    model = description.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise InputError("GGUF export supports byte-level BPE tokenizers (GPT-2 style, e.g. SmolLM2); this one is "
                         f"{model.get('type')}{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}")
    pre = pre_tokenizer_name(description)
    tokens, types = vocab_tokens(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    tokenizer.save_pretrained(str(scratch))  # SpecialVocab reads merges, special ids and the chat template from files
    special = gguf.SpecialVocab(scratch, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    return pre


# ---- the file -------------------------------------------------------------------------------------------------------

def gguf_tensors(model, hf: dict, quant: str):
    """(GGUF name, numpy data, raw type, type name) for every tensor, q/k permuted; and the zeroed halves."""
    from .export import hf_state_dict

    n_layers = model.cfg.n_layers
    state, zeroed = filled_state(hf_state_dict(model), hf, n_layers)
    n_heads = hf["num_attention_heads"]
    n_kv = hf.get("num_key_value_heads") or n_heads
    tied = "lm_head.weight" not in state
    out = []
    for hf_name, t in state.items():
        name = gguf_tensor_name(hf_name)
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            t = permute_qk(t, n_heads)
        elif name.endswith(("attn_k.weight", "attn_k.bias")):
            t = permute_qk(t, n_kv)
        ggml_type = tensor_type(name, tuple(t.shape), quant, tied)
        data, raw = encode_tensor(t, ggml_type)
        out.append((name, data, raw, ggml_type))
    return out, zeroed


def own_arch_tensors(model, spec, hf: dict, quant: str):
    """`gguf_tensors` for an architecture of residscope's GGUF table (model/gguf_archs.py): convert's names from the
    gguf package's table, convert's rewrites (`Arch.redo`). Sub-block pruning has no expression there: refused."""
    from .export import hf_state_dict
    from .gguf_archs import converted, gguf_name_of

    removed = {"attn": list(model.cfg.removed_attn), "mlp": list(model.cfg.removed_mlp)}
    if removed["attn"] or removed["mlp"]:
        raise InputError(f"GGUF export of {spec.model_type}: removed attention/MLP halves {removed} cannot be written "
                         "(only llama blocks are written with zero halves); remove whole layers instead")
    state = hf_state_dict(model)
    tied = "lm_head.weight" not in state
    out = []
    for hf_name, t in state.items():
        try:
            name = gguf_name_of(spec, hf_name, model.cfg.n_layers)
        except KeyError:
            raise InputError(f"GGUF export: tensor {hf_name!r} has no place in llama.cpp's {spec.arch} "
                             "architecture") from None
        data = converted(spec, name, t.detach().to("cpu", torch.float32).numpy(), hf)
        ggml_type = tensor_type(name, tuple(data.shape), quant, tied)
        raw_data, raw = encode_tensor(torch.from_numpy(np.ascontiguousarray(data)), ggml_type)
        out.append((name, raw_data, raw, ggml_type))
    return out, {"attn": [], "mlp": []}


def _own_arch(hf: dict):
    """(table entry, normalised config dict, metadata) when residscope's GGUF table writes this model_type, else None;
    InputError for a config whose metadata could not say everything it computes."""
    from transformers import AutoConfig

    from .gguf_archs import for_model_type, metadata_of, unexpressed

    spec = for_model_type(hf.get("model_type"))
    if spec is None:
        return None
    skip = ("model_type", "architectures", "transformers_version", "_name_or_path")
    normal = AutoConfig.for_model(spec.model_type, **{k: v for k, v in hf.items() if k not in skip}).to_dict()
    stated = metadata_of(spec, normal)
    problem = unexpressed(spec, normal, stated)
    if problem is not None:
        raise InputError(f"GGUF export: llama.cpp's {spec.arch} architecture cannot express {problem}")
    return spec, normal, stated


def write_gguf(model, path: str | os.PathLike, *, quant: str = "f32", force: bool = False,
               name: str | None = None) -> GGUFExport:
    """Write `model` (dense or pruned, byte-level BPE tokenizer) to `path` as GGUF: llama architecture for
    llama/mistral models, else the architecture residscope's GGUF table (model/gguf_archs.py) has for its model_type
    (gptneox, olmo2); see the module docstring. Every refusal is one line and happens before anything is written."""
    import gguf

    from .export import hf_config_of
    from .gguf_archs import add_metadata

    check_quant(quant)
    path = check_gguf_target(path, force=force)
    if getattr(model, "offload", None) is not None:
        raise InputError("GGUF export: load the model without --offload (the writer needs every tensor in memory)")
    if model.tokenizer is None:
        raise InputError("GGUF export needs the model's tokenizer (llama.cpp reads it from the file)")
    hf = hf_config_of(model)
    own = _own_arch(hf)
    if own is None:
        check_exportable(hf)
    n_layers = model.cfg.n_layers
    if own is None:
        tensors, zeroed = gguf_tensors(model, hf, quant)
    else:
        tensors, zeroed = own_arch_tensors(model, own[0], own[1], quant)
    n_vocab = dict((n, d) for n, d, _, _ in tensors)["token_embd.weight"].shape[0]
    if zeroed["attn"] or zeroed["mlp"]:
        warnings.warn(f"{path}: removed attention/MLP halves {zeroed} are written as zero tensors (llama.cpp's llama "
                      "blocks always have both halves; zeros contribute nothing, so the function is unchanged)",
                      UserWarning, stacklevel=2)
    origin = [int(i) for i in model.layer_origin]
    label = name or str(hf.get("_model_name_or_path") or model.source or "residscope model")
    types: dict[str, int] = {}
    for _, _, _, t in tensors:
        types[t] = types.get(t, 0) + 1

    def write(tmp: Path) -> None:
        if own is None:
            writer = gguf.GGUFWriter(tmp, "llama")
            add_llama_metadata(writer, hf, n_layers=n_layers, n_vocab=n_vocab, quant=quant, name=label)
        else:
            spec, _, stated = own
            writer = gguf.GGUFWriter(tmp, spec.arch)
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_name(label)
            add_metadata(writer, spec, {**stated, "vocab_size": n_vocab})
            add_file_type(writer, quant)
        with tempfile.TemporaryDirectory() as scratch:
            pre_box.append(add_tokenizer(writer, model.tokenizer, n_vocab, Path(scratch)))
        writer.add_array("residscope.layer_origin", origin)
        writer.add_string("residscope.removed_layers",
                          json.dumps([i for i in range(model.n_layers_original) if i not in origin]))
        writer.add_string("residscope.zeroed_sublayers", json.dumps(zeroed))
        for tensor_name, data, raw, _ in tensors:
            writer.add_tensor(tensor_name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    pre_box: list[str] = []
    atomic_write(path, write)
    return GGUFExport(path=str(path), quant=quant, n_layers=n_layers, n_tensors=len(tensors),
                      n_bytes=path.stat().st_size, tensor_types=types, tokenizer_pre=pre_box[0] if pre_box else None,
                      zeroed_sublayers=zeroed)
