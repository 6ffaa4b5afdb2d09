"""residscope's own GGUF -> Hugging Face mapping, for the llama.cpp architectures transformers' GGUF reader lacks.

transformers reads GGUF files of some architectures (model/gguf.py uses it for those); for the others (gptneox: Pythia,
GPT-NeoX-20B; olmo2: OLMo 2) we undo llama.cpp's `convert_hf_to_gguf.py` ourselves. One architecture is one `Arch`
entry in `ARCHS`, pure data:
- `meta`: llama.cpp's metadata keys (`{arch}.<key>`) -> the transformers config field each one is. A key the converter
  always writes is required: a file without it is refused in one line naming the file and key. A key it writes only
  sometimes carries llama.cpp's loader default (`llama_model_loader::get_key(..., required=false)`), which is what
  the file means to llama.cpp (GPTNeoXModel never writes `rope.freq_base`: llama.cpp rotates with base 10000).
- `checked`: keys the converter may write that repeat what the config already says (a head size, a vocabulary size);
  they must agree. Any other `{arch}.*` key states something this mapping does not read (sliding windows, RoPE
  scaling, clamps) and is refused: residscope never loads a file as a different model than llama.cpp runs.
- `fixed`: what llama.cpp hard-codes for the architecture and the file therefore never states (the MLP activation).
- `flags`: config booleans a tensor's presence decides (`attention_bias` <- `blk.0.attn_qkv.bias`).
- `undo`: the inverse of the converter's per-tensor rewrites, by GGUF tensor name inside `blk.{i}.` (GPT-NeoX's
  `query_key_value` regrouped from per-head [q, k, v] into [q; k; v] rows).
Tensor names come from the `gguf` package's own table: the transformers model the config describes is built on the
meta device, and each of its parameter names goes through `gguf.get_tensor_name_map(arch, n_layers)` forward (the
direction convert uses, which is unambiguous); inverting that gives GGUF name -> transformers name for this model.
Quantized tensors are dequantized with `gguf.quants.dequantize`. The tokenizer is transformers' own GGUF tokenizer
converter (byte-level BPE from `tokenizer.ggml.*`), built as the family's tokenizer class.
Read the other way (`encode`, `redo`, `metadata_of`, `unexpressed`), the same table is GGUF export's for these
architectures (model/gguf_export.py): a config the metadata could not give back is refused rather than written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import CheckpointError

REQUIRED = object()  # a Meta default: the key must be in the file


@dataclass(frozen=True)
class Meta:
    """One metadata key `{arch}.<key>` and the transformers config field it fills."""

    key: str
    field: str | None  # None: read for `Arch.derive` only
    default: object = REQUIRED  # llama.cpp's default where its converter may leave the key out


@dataclass(frozen=True)
class Arch:
    arch: str  # general.architecture
    model_type: str  # the transformers model_type it converts into
    meta: tuple[Meta, ...]
    derive: Callable[[dict, dict], dict]  # (fields read so far, {key: value} of the file) -> more config fields
    checked: dict[str, Callable[[dict], object]] = field(default_factory=dict)  # key -> value the config implies
    fixed: dict = field(default_factory=dict)
    flags: dict[str, str] = field(default_factory=dict)  # config field -> tensor whose presence makes it True
    undo: dict[str, Callable[[np.ndarray, dict], np.ndarray]] = field(default_factory=dict)
    # tokenizer.ggml.bos_token_id is the tokenizer's BOS; whether it is also the config's bos_token_id (which decides
    # residscope's default_prepend_bos) is the family's: OLMo 2's configs leave it null, so no BOS goes in front
    config_bos: bool = True
    # export (gguf_export.py): the same table read the other way
    encode: Callable[[dict], dict] = lambda cfg: {}  # transformers config -> the keys `derive` reads (field None)
    redo: dict[str, Callable[[np.ndarray, dict], np.ndarray]] = field(default_factory=dict)  # inverse of `undo`


# the keys TextModel.set_gguf_parameters writes for every architecture
_SHAPE = (Meta("context_length", "max_position_embeddings"), Meta("embedding_length", "hidden_size"),
          Meta("block_count", "num_hidden_layers"), Meta("feed_forward_length", "intermediate_size"),
          Meta("attention.head_count", "num_attention_heads"))


def _head_dim(cfg: dict) -> int:
    return cfg["hidden_size"] // cfg["num_attention_heads"]


def _heads_regrouped(data: np.ndarray, cfg: dict) -> np.ndarray:
    """GPTNeoXModel.modify_tensors, inverted: rows [q; k; v] (all heads each) -> per head [q, k, v] rows."""
    n_head = cfg["num_attention_heads"]
    parts = data.reshape(3, n_head, -1, *data.shape[1:])  # [part, head, d_head, (d_model)]
    return np.ascontiguousarray(parts.swapaxes(0, 1).reshape(data.shape))  # [head, part, d_head, ...] flattened


def _heads_interleaved(data: np.ndarray, cfg: dict) -> np.ndarray:
    """GPTNeoXModel.modify_tensors: per head [q, k, v] rows -> rows [q; k; v]."""
    n_head = cfg["num_attention_heads"]
    per_head = data.reshape(n_head, 3, -1, *data.shape[1:])  # [head, part, d_head, (d_model)]
    return np.ascontiguousarray(per_head.swapaxes(0, 1).reshape(data.shape))


def _rope_block(cfg: dict) -> dict:
    return cfg.get("rope_parameters") or {}


def _partial_rope(cfg: dict, stated: dict) -> dict:
    """rope.dimension_count -> the fraction of each head rotated (transformers' partial_rotary_factor, Pythia's
    rotary_pct), exact: transformers rotates int(head_dim * factor) dimensions."""
    head_dim, rotated = _head_dim(cfg), stated["rope.dimension_count"]
    factor = rotated / head_dim
    if not (isinstance(rotated, int) and 0 < rotated <= head_dim and rotated % 2 == 0
            and int(head_dim * factor) == rotated):
        raise ValueError(f"rope.dimension_count={rotated!r} (heads have {head_dim} dimensions)")
    return {"rope_parameters": {"rope_type": "default", "rope_theta": float(stated["rope.freq_base"]),
                                "partial_rotary_factor": factor}}


def _full_rope(cfg: dict, stated: dict) -> dict:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": float(stated["rope.freq_base"])}}


ARCHS: dict[str, Arch] = {a.arch: a for a in (
    Arch("gptneox", "gpt_neox",  # convert_hf_to_gguf.py GPTNeoXModel; llama.cpp's LLM_ARCH_GPTNEOX
         meta=(*_SHAPE, Meta("attention.layer_norm_epsilon", "layer_norm_eps"),
               Meta("use_parallel_residual", "use_parallel_residual"), Meta("rope.dimension_count", None),
               Meta("rope.freq_base", None, 10000.0)),
         derive=_partial_rope,
         checked={"attention.head_count_kv": lambda cfg: cfg["num_attention_heads"],
                  "attention.key_length": _head_dim, "attention.value_length": _head_dim},
         fixed={"hidden_act": "gelu"},  # Pythia's exact GELU (llama.cpp computes ggml_gelu, its tanh approximation)
         flags={"attention_bias": "blk.0.attn_qkv.bias"},
         undo={"attn_qkv.weight": _heads_regrouped, "attn_qkv.bias": _heads_regrouped},
         encode=lambda cfg: {"rope.dimension_count": int(_head_dim(cfg) * _rope_block(cfg).get("partial_rotary_factor", 1.0)),
                             "rope.freq_base": float(_rope_block(cfg).get("rope_theta", 10000.0))},
         redo={"attn_qkv.weight": _heads_interleaved, "attn_qkv.bias": _heads_interleaved}),
    Arch("olmo2", "olmo2",  # convert_hf_to_gguf.py Olmo2Model (TextModel's keys, tensors unchanged: NEOX-style RoPE)
         meta=(*_SHAPE, Meta("attention.head_count_kv", "num_key_value_heads", None),
               Meta("attention.layer_norm_rms_epsilon", "rms_norm_eps"), Meta("rope.freq_base", None, 10000.0)),
         derive=_full_rope,
         checked={"rope.dimension_count": _head_dim, "attention.key_length": _head_dim,
                  "attention.value_length": _head_dim},
         fixed={"hidden_act": "silu"},
         flags={"attention_bias": "blk.0.attn_q.bias"}, config_bos=False,
         encode=lambda cfg: {"rope.freq_base": float(_rope_block(cfg).get("rope_theta", 10000.0))}),
)}
_ANY_ARCH_CHECKED = {"vocab_size": lambda cfg: cfg["vocab_size"]}


def own_mapping(arch: str) -> Arch | None:
    """The entry for a GGUF architecture residscope converts itself (None: transformers' reader, or nobody)."""
    return ARCHS.get(arch)


def for_model_type(model_type: str) -> Arch | None:
    """The entry that writes a transformers model_type (GGUF export), None when the table has none."""
    return next((a for a in ARCHS.values() if a.model_type == model_type), None)


# ---- metadata -> config --------------------------------------------------------------------------------------------

def _scalar(reader, key: str, path: Path):
    """A scalar metadata value; floats (stored as float32) as the shortest decimal that rounds to them, which is the
    value the source config.json said (1e-05, not 9.99999974738e-06)."""
    import gguf

    f = reader.fields[key]
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        raise CheckpointError(f"{path}: GGUF metadata {key} is a per-layer list; residscope reads one value for all layers")
    value = f.contents()
    if f.types and f.types[0] == gguf.GGUFValueType.FLOAT32:
        value = float(str(np.float32(value)))
    return value


def config_fields(reader, spec: Arch, path: Path) -> dict:
    """The transformers config dict the file's metadata states (model_type, shapes, eps, RoPE, token ids, tying)."""
    prefix = f"{spec.arch}."
    stated, cfg = {}, {}
    for m in spec.meta:
        key = prefix + m.key
        if key in reader.fields:
            stated[m.key] = _scalar(reader, key, path)
        elif m.default is REQUIRED:
            raise CheckpointError(f"{path}: GGUF metadata has no {key}, which {spec.arch} files must state")
        else:
            stated[m.key] = m.default
        if m.field is not None:
            cfg[m.field] = stated[m.key]
    for key in reader.fields:
        if key.startswith(prefix) and key[len(prefix):] not in stated and key[len(prefix):] not in spec.checked \
                and key[len(prefix):] not in _ANY_ARCH_CHECKED:
            raise CheckpointError(f"{path}: GGUF metadata {key} states something residscope's {spec.arch} mapping "
                                  "does not read; loading would compute another model")
    if cfg.get("num_key_value_heads", 0) is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]  # llama.cpp: n_head_kv defaults to n_head
    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"):
        if not isinstance(cfg[name], int) or cfg[name] <= 0:
            raise CheckpointError(f"{path}: GGUF metadata {prefix}{_key_of(spec, name)}={cfg[name]!r} must be a positive integer")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise CheckpointError(f"{path}: {prefix}embedding_length={cfg['hidden_size']} is not a multiple of "
                              f"{prefix}attention.head_count={cfg['num_attention_heads']}")
    try:
        cfg.update(spec.derive(cfg, stated))
    except ValueError as e:
        raise CheckpointError(f"{path}: GGUF metadata {prefix}{e}") from None
    cfg.update(spec.fixed, model_type=spec.model_type)
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        cfg[name] = reader.fields[f"tokenizer.ggml.{key}"].contents() if f"tokenizer.ggml.{key}" in reader.fields else None
    if not spec.config_bos:
        cfg["bos_token_id"] = None
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: GGUF has no tensor token_embd.weight")
    cfg["vocab_size"] = int(tensors["token_embd.weight"].shape[-1])  # ggml order: [d_model, vocab]
    cfg["tie_word_embeddings"] = "output.weight" not in tensors
    for name, tensor in spec.flags.items():
        cfg[name] = tensor in tensors
    for key, implied in {**spec.checked, **_ANY_ARCH_CHECKED}.items():
        if prefix + key in reader.fields and key not in stated and _scalar(reader, prefix + key, path) != implied(cfg):
            raise CheckpointError(f"{path}: GGUF metadata {prefix}{key}={_scalar(reader, prefix + key, path)} "
                                  f"disagrees with the rest of the file ({implied(cfg)})")
    return cfg


def _key_of(spec: Arch, field_name: str) -> str:
    return next(m.key for m in spec.meta if m.field == field_name)


# ---- tensors --------------------------------------------------------------------------------------------------------

def tensor_names(spec: Arch, hf_names, n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> transformers name, for the transformers parameters `hf_names` (the gguf package's table,
    applied in convert's direction and inverted)."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == spec.arch)
    table = gguf.get_tensor_name_map(arch_id, n_layers)
    out = {}
    for hf_name in hf_names:
        stem, suffix = hf_name.rsplit(".", 1)
        gguf_stem = table.get_name(stem)
        if gguf_stem is None:
            raise CheckpointError(f"gguf's {spec.arch} tensor table has no name for {hf_name}")  # a bug, not the file's
        out[f"{gguf_stem}.{suffix}"] = hf_name
    return out


def dequantized(tensor) -> np.ndarray:
    """A reader tensor as float32 numpy, in numpy's (row-major, reversed ggml) shape."""
    import gguf

    if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                              gguf.GGMLQuantizationType.F64):
        return np.asarray(tensor.data, dtype=np.float32)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)


def hf_tensors(reader, spec: Arch, cfg: dict, expected: dict, path: Path) -> dict:
    """transformers name -> float32 torch tensor, every one the model needs (`expected`: name -> shape), the
    converter's rewrites undone. Refuses a missing, unexpected or mis-shaped tensor in one line."""
    import torch

    names = tensor_names(spec, expected, cfg["num_hidden_layers"])
    out = {}
    for tensor in reader.tensors:
        hf_name = names.get(tensor.name)
        if hf_name is None:
            raise CheckpointError(f"{path}: unexpected tensor {tensor.name} for a {spec.arch} model of this config")
        data = dequantized(tensor)
        inner = tensor.name.split(".", 2)[2] if tensor.name.startswith("blk.") else tensor.name
        if inner in spec.undo:
            data = spec.undo[inner](data, cfg)
        if tuple(data.shape) != tuple(expected[hf_name]):
            raise CheckpointError(f"{path}: tensor {tensor.name} has shape {tuple(data.shape)}, "
                                  f"the metadata implies {tuple(expected[hf_name])}")
        out[hf_name] = torch.from_numpy(np.array(data, dtype=np.float32, order="C"))  # a copy: the reader maps the file read-only
    missing = [g for g, h in names.items() if h not in out]
    if missing:
        raise CheckpointError(f"{path}: GGUF has no tensor {missing[0]} ({len(missing)} missing in all)")
    return out


# ---- the folder ----------------------------------------------------------------------------------------------------

def write_own_hf_folder(gguf_path: Path, out_dir: Path, spec: Arch) -> None:
    """config.json, generation_config.json, model.safetensors (float32) and the tokenizer, as `save_pretrained`
    would write them for the model the file holds."""
    import gguf
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    reader = gguf.GGUFReader(str(gguf_path))
    fields = config_fields(reader, spec, gguf_path)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()
                if not (config.tie_word_embeddings and k == "lm_head.weight")}
    tensors = hf_tensors(reader, spec, fields, expected, gguf_path)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors

    config.architectures = [type(skeleton).__name__]
    config.dtype = torch.float32
    config.save_pretrained(out_dir)
    try:
        GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    except ValueError:
        pass
    _tokenizer(gguf_path, model_type).save_pretrained(out_dir)


def _tokenizer(gguf_path: Path, model_type: str):
    """transformers' GGUF tokenizer converter, as the family's tokenizer class (its BOS/EOS settings from the file's
    `tokenizer.ggml.add_bos_token`, like any GGUF tokenizer transformers builds)."""
    import transformers
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    name = TOKENIZER_MAPPING_NAMES.get(model_type) or "TokenizersBackend"
    cls = getattr(transformers, name if isinstance(name, str) else next(n for n in name if n), None)
    if cls is None:
        cls = transformers.PreTrainedTokenizerFast
    try:
        return cls.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{gguf_path}: cannot build its tokenizer ({str(e).splitlines()[0]})") from None


# ---- export: the table read the other way --------------------------------------------------------------------------

def metadata_of(spec: Arch, hf: dict) -> dict:
    """{key inside `{arch}.`: value} that convert_hf_to_gguf.py would write for a transformers config dict (as
    `PretrainedConfig.to_dict()` gives it), including the keys whose default llama.cpp would assume."""
    stated = {m.key: hf[m.field] for m in spec.meta if m.field is not None and hf.get(m.field) is not None}
    stated.update(spec.encode(hf))
    return stated


def unexpressed(spec: Arch, hf: dict, stated: dict) -> str | None:
    """The first config field (`name=value`) the metadata would not give back when loaded, None when every one does:
    what the architecture's GGUF cannot say (a RoPE scaling, another activation) must not be exported silently."""
    cfg = {m.field: stated.get(m.key, m.default) for m in spec.meta if m.field is not None}
    try:
        cfg.update(spec.derive(cfg, {**{m.key: m.default for m in spec.meta}, **stated}))
    except ValueError as e:
        return str(e)
    cfg.update(spec.fixed)
    for name, value in cfg.items():
        given = hf.get(name)
        if name == "rope_parameters":
            given = {k: v for k, v in (given or {}).items() if v is not None}
            value = {k: v for k, v in value.items() if v is not None}
            given.setdefault("partial_rotary_factor", value.get("partial_rotary_factor", 1.0))
            value.setdefault("partial_rotary_factor", 1.0)
        if given != value:
            return f"{name}={given!r} (the {spec.arch} GGUF metadata would say {value!r})"
    return None


def gguf_name_of(spec: Arch, hf_name: str, n_layers: int) -> str:
    """The GGUF name convert gives a transformers tensor (the gguf package's table); KeyError when it has none."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == spec.arch)
    name = gguf.get_tensor_name_map(arch_id, n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise KeyError(hf_name)
    return name


def converted(spec: Arch, gguf_name: str, data: np.ndarray, hf: dict) -> np.ndarray:
    """`data` rewritten as convert writes it under `gguf_name` (the inverse of `undo`)."""
    inner = gguf_name.split(".", 2)[2] if gguf_name.startswith("blk.") else gguf_name
    return spec.redo[inner](data, hf) if inner in spec.redo else data


def add_metadata(writer, spec: Arch, stated: dict) -> None:
    """Typed as llama.cpp's loader reads them: bool, uint32 counts, float32 reals."""
    for key, value in stated.items():
        full = f"{spec.arch}.{key}"
        if isinstance(value, bool):
            writer.add_bool(full, value)
        elif isinstance(value, int):
            writer.add_uint32(full, value)
        else:
            writer.add_float32(full, float(value))
