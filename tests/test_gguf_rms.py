"""GGUF files of the RMSNorm families, written from random transformers models by the `gguf` package's writer the way
llama.cpp's convert_hf_to_gguf.py writes them (its tensor names through `gguf.TensorNameMap`, its metadata keys, Gemma's
norms stored as w + 1), then loaded by residscope through transformers' GGUF reader: the logits must be the source
model's. Qwen3, Gemma 2 and Phi-3 load; what transformers' reader cannot read is refused, never approximated (Phi-3
with LongRoPE factors or a partial rotary dimension; Qwen3 with a head_dim other than the 128 its reader assumes).
OLMo 2, which transformers cannot read, loads through residscope's own mapping (tests/test_gguf_archs.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close
from transformers import (Gemma2Config, Gemma2ForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

from family_zoo import randomize
from residscope.model import load_model
from residscope.model.errors import CheckpointError

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma's ids: pad 0, eos 1, bos 2, unk 3
WORD_PIECES = ["\u2581", "\u2581t", "he", "\u2581the", "\u2581a"] + list("abcdefghijklmnopqrstuvwxyz .,")
VOCAB = len(SPECIALS) + len(WORD_PIECES)  # the model has 8 embedding rows more, as real vocabularies are padded
SHAPE = dict(vocab_size=VOCAB + 8, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def _add_vocab(w) -> None:
    """A sentencepiece vocabulary (tokenizer.ggml.model "llama"): scores, token types, no merges."""
    tokens = SPECIALS + WORD_PIECES
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(SPECIALS) + [-float(i) for i in range(len(WORD_PIECES))])
    w.add_token_types([3, 3, 3, 2] + [1] * len(WORD_PIECES))  # control, control, control, unknown, normal
    w.add_pad_token_id(0)
    w.add_eos_token_id(1)
    w.add_bos_token_id(2)
    w.add_unk_token_id(3)


def write_gguf(path, model, arch: str, metadata) -> None:
    """Every tensor of `model` under llama.cpp's name for `arch` (gguf.TensorNameMap), with `metadata(writer, config)`
    for the architecture's keys; Gemma's norms as w + 1, as convert_hf_to_gguf.py stores them."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    metadata(w, cfg)
    _add_vocab(w)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        data = tensor.detach().numpy().astype(np.float32)
        if arch.startswith("gemma") and stem.endswith("norm"):
            data = data + 1
        w.add_tensor(f"{names.get_name(stem)}.{suffix}", data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def head_dims(w, cfg) -> None:
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)


def gemma2_keys(w, cfg) -> None:
    head_dims(w, cfg)
    w.add_sliding_window(cfg.sliding_window)
    w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    w.add_final_logit_softcapping(cfg.final_logit_softcapping)


def phi3_keys(w, cfg) -> None:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w.add_rope_dimension_count(int(head_dim * cfg.rope_parameters.get("partial_rotary_factor", 1.0)))
    w.add_uint32("phi3.rope.scaling.original_context_length", cfg.original_max_position_embeddings)


def build(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    return randomize(model_cls(config_cls(**kw)))


# Real files' shapes where transformers' reader assumes them: Qwen3's head_dim 128 (its reader ignores key_length),
# Gemma 2's soft-caps 50 / 30 and query_pre_attn_scalar 256 (not in the file)
LOADABLE = {
    "qwen3": (lambda: build(Qwen3Config, Qwen3ForCausalLM, **SHAPE, head_dim=128, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 1000.0}), head_dims),
    "gemma2": (lambda: build(Gemma2Config, Gemma2ForCausalLM, **SHAPE, head_dim=256, sliding_window=6,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000.0}), gemma2_keys),
    "phi3": (lambda: build(Phi3Config, Phi3ForCausalLM, **SHAPE, sliding_window=None,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000.0}), phi3_keys),
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESIDSCOPE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("arch", sorted(LOADABLE))
def test_gguf_of_the_family_loads_with_the_source_models_logits(arch, tmp_path, cache):
    make, keys = LOADABLE[arch]
    source = make()
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(path, source, arch, keys)
    model = load_model(path)
    assert model.cfg.model_type == arch
    tokens = torch.randint(4, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(model(tokens), source(tokens).logits, atol=1e-4, rtol=1e-4)
    assert model.to_str_tokens("the a") == [t for t in model.to_str_tokens("the a")]  # the tokenizer came along


def test_qwen3_gguf_with_another_head_dim_is_refused(tmp_path, cache):
    """transformers' Qwen3 GGUF reader does not read attention.key_length: a head_dim other than 128 cannot load."""
    source = build(Qwen3Config, Qwen3ForCausalLM, **SHAPE, head_dim=32, rope_parameters={"rope_theta": 1000.0})
    path = tmp_path / "tiny-qwen3-d32.gguf"
    write_gguf(path, source, "qwen3", head_dims)
    with pytest.raises(CheckpointError, match="shape") as err:
        load_model(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("option", ["partial-rotary", "longrope"])
def test_phi3_gguf_with_what_transformers_drops_is_refused(option, tmp_path, cache):
    """transformers' Phi-3 GGUF reader ignores rope.dimension_count and llama.cpp's LongRoPE factor tensors: such a
    file (Phi-3.5, Phi-4-mini) would load as a different model, so it is refused."""
    import gguf

    source = LOADABLE["phi3"][0]()
    path = tmp_path / f"tiny-phi3-{option}.gguf"

    def keys(w, cfg):
        w.add_uint32("phi3.rope.scaling.original_context_length", 16)
        if option == "partial-rotary":
            w.add_rope_dimension_count(8)
        else:
            w.add_rope_dimension_count(16)
            w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.full(8, 2.0, np.float32))
            w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", np.ones(8, np.float32))

    write_gguf(path, source, "phi3", keys)
    with pytest.raises(CheckpointError, match="ignores.*(dimension_count=8|rope_factors)") as err:
        load_model(path)
    assert "\n" not in str(err.value)


def test_gemma2_gguf_whose_soft_cap_transformers_would_not_use_is_refused(tmp_path, cache):
    source = build(Gemma2Config, Gemma2ForCausalLM, **SHAPE, head_dim=256, attn_logit_softcapping=20.0,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    path = tmp_path / "tiny-gemma2-cap20.gguf"
    write_gguf(path, source, "gemma2", gemma2_keys)
    with pytest.raises(CheckpointError, match="attn_logit_softcapping=20"):
        load_model(path)
