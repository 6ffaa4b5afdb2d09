"""Checks of config.json keys that transformers makes while loading a model or its tokenizer, made by residscope's own
reader before anything else reads the folder: a key residscope would otherwise misread (quantized codes taken for
weights), a RoPE scaling block missing the keys its type needs, special-token ids that are not integers.

Each refusal is a ConfigError of one line naming the file and the key. `decoder_kwargs` calls `check_config_keys`, so
every family and every way in (folder, GGUF conversion, `DecoderConfig.from_hf`) gets these checks.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

# keys a RoPE block of each type must hold (transformers' `_validate_*_rope_parameters`; rope_theta comes from the
# top-level config when a block lacks it, so it is not required here)
ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_LAYER_TYPE_BLOCKS = ("full_attention", "sliding_attention")


def check_config_keys(cfg: dict[str, Any], source: str, family=None) -> None:
    """Refuse, in one line naming `source` and the key, what the rest of the reader would take silently. `family`
    (model/families/base.Family) may word the quantization refusal for its checkpoints."""
    check_quantization(cfg, source, getattr(family, "quantization_note", None))
    check_token_ids(cfg, source)
    for where, block in rope_blocks(cfg, source):
        check_rope_block(block, f"{source}: {where}")


def check_quantization(cfg: dict, source: str, note: str | None = None) -> None:
    """A quantized checkpoint stores integer codes plus scales; residscope reads plain float weights only, so taking
    the codes as weights would compute garbage. (GGUF files are dequantised by residscope's converter instead.)
    `note`: the family's own advice (gpt-oss: its MXFP4 experts), said instead of the generic one."""
    quant = cfg.get("quantization_config")
    if quant in (None, {}):
        return
    method = quant.get("quant_method", "?") if isinstance(quant, dict) else type(quant).__name__
    raise ConfigError(f"{source}: quantization_config (quant_method {method!r}) is not implemented by residscope; "
                      + (note or "dequantize the checkpoint to float weights first"))


def check_token_ids(cfg: dict, source: str) -> None:
    """bos / pad ids: an integer >= 0 or null; eos: that or a list of them (transformers allows several)."""
    for key in ("bos_token_id", "pad_token_id", "eos_token_id"):
        value = cfg.get(key)
        values = value if key == "eos_token_id" and isinstance(value, list) else [value]
        for v in values:
            if v is None and not isinstance(value, list):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                kind = "an integer id >= 0" + (" or a list of them" if key == "eos_token_id" else "") + " (or null)"
                raise ConfigError(f"{source}: {key} must be {kind}, got {value!r}")


def rope_blocks(cfg: dict, source: str) -> list[tuple[str, dict]]:
    """(key path, block) of every RoPE parameter block: legacy rope_scaling, rope_parameters, or rope_parameters per
    layer type (Gemma 3 in transformers 5)."""
    out = []
    for key in ("rope_scaling", "rope_parameters"):
        block = cfg.get(key)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise ConfigError(f"{source}: {key} must be an object, got {block!r}")
        if any(t in block for t in _LAYER_TYPE_BLOCKS):
            out += [(f"{key}.{t}", block[t]) for t in _LAYER_TYPE_BLOCKS if isinstance(block.get(t), dict)]
        else:
            out.append((key, block))
    return out


def check_rope_block(block: dict, where: str) -> None:
    rope_type = block.get("rope_type", block.get("type", "default"))
    for key in ROPE_REQUIRED.get(rope_type, ()):  # an unknown type is refused, naming it, by the RoPE reader
        if block.get(key) is None:
            raise ConfigError(f"{where}: rope_type {rope_type!r} needs {key!r}, which is missing")
