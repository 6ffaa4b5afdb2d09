"""GGUF files of the architectures transformers' GGUF reader lacks (gptneox, olmo2), loaded through residscope's own
mapping (model/gguf_archs.py). The files are written from random transformers models exactly as llama.cpp's
convert_hf_to_gguf.py writes them (GPTNeoXModel, Olmo2Model: its metadata keys, its tensor names through the gguf
package's table, GPT-NeoX's query_key_value regrouped into [q; k; v] rows, its output types); the loaded model's
logits must be the source model's, with the weights rounded as the file stores them (f16, q8_0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Olmo2Config, Olmo2ForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from family_zoo import randomize
from residscope.model import load_model
from residscope.model.errors import CheckpointError

EOT = "<|endoftext|>"
TOKENS = list(bytes_to_unicode().values()) + ["\u0120t", "he", "\u0120the", EOT]  # byte-level BPE, like Pythia's
MERGES = ["\u0120 t", "h e", "\u0120t he"]
N_VOCAB = len(TOKENS) + 4  # embedding rows beyond the tokenizer's, as real checkpoints pad them


def make(arch: str, **kw):
    torch.manual_seed(0)
    if arch == "gptneox":  # rotary_pct 0.25 of d_head 16: 4 rotated dims; rope base 10000 (convert never writes it)
        cfg = GPTNeoXConfig(**{**dict(vocab_size=N_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.25,
                                      layer_norm_eps=1e-5, bos_token_id=len(TOKENS) - 1,
                                      eos_token_id=len(TOKENS) - 1), **kw})
        return randomize(GPTNeoXForCausalLM(cfg))
    cfg = Olmo2Config(**{**dict(vocab_size=N_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                rms_norm_eps=1e-6, pad_token_id=None, bos_token_id=None,
                                eos_token_id=len(TOKENS) - 1,
                                rope_parameters={"rope_type": "default", "rope_theta": 5000.0}), **kw})
    return randomize(Olmo2ForCausalLM(cfg))


def _metadata(w, arch: str, c) -> None:
    """GPTNeoXModel.set_gguf_parameters / TextModel.set_gguf_parameters (Olmo2Model adds nothing without sliding
    windows)."""
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    if arch == "gptneox":
        head_dim = c.hidden_size // c.num_attention_heads
        w.add_rope_dimension_count(int(c.rope_parameters["partial_rotary_factor"] * head_dim))
        w.add_parallel_residual(c.use_parallel_residual)
        w.add_layer_norm_eps(c.layer_norm_eps)
    else:
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(c.rms_norm_eps)


def _vocab(w) -> None:
    """TextModel._set_vocab_gpt2: the tokens (padded to the model's vocabulary with [PAD{i}] UNUSED), types, merges,
    special ids."""
    tokens = TOKENS + [f"[PAD{i}]" for i in range(len(TOKENS), N_VOCAB)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(TOKENS) - 1) + [3] + [5] * (N_VOCAB - len(TOKENS)))  # normal, control, unused
    w.add_token_merges(MERGES)
    w.add_bos_token_id(len(TOKENS) - 1)
    w.add_eos_token_id(len(TOKENS) - 1)


def _regroup_qkv(data: np.ndarray, n_head: int) -> np.ndarray:
    """GPTNeoXModel.modify_tensors: per-head [q, k, v] rows -> [q; k; v]."""
    per_head = data.reshape(n_head, 3, -1, *data.shape[1:])
    return np.concatenate([per_head[:, p].reshape(-1, *data.shape[1:]) for p in range(3)])


def _stored(data: np.ndarray, out_type: str):
    """(array, raw_dtype) as convert stores a tensor for --outtype: 1-D tensors stay f32; matrices f16, or q8_0 when
    rows split into blocks of 32 (else f16)."""
    import gguf

    if data.ndim == 1 or out_type == "f32":
        return data.astype(np.float32), None
    if out_type == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def convert(hf, path, arch: str, *, out_type: str = "f32", drop_key: str | None = None,
            drop_tensor: str | None = None, extra=None) -> None:
    """`hf` as convert_hf_to_gguf.py writes it (drop_key / drop_tensor / extra(writer): bad files)."""
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    _metadata(w, arch, c)
    w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[out_type])
    if drop_key is not None:
        del w.kv_data[0][drop_key]
    if extra is not None:
        extra(w)
    _vocab(w)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    table = gguf.get_tensor_name_map(arch_id, c.num_hidden_layers)
    for hf_name, tensor in hf.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        data = tensor.detach().numpy().astype(np.float32)
        if arch == "gptneox" and "query_key_value" in hf_name:
            data = _regroup_qkv(data, c.num_attention_heads)
        name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name == drop_tensor:
            continue
        data, raw_dtype = _stored(data, out_type)
        w.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def as_stored(hf, out_type: str):
    """`hf` with every matrix rounded the way the file stores it: the model the file holds."""
    import gguf

    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() < 2 or out_type == "f32":
                continue
            data = p.detach().numpy().astype(np.float32)
            if out_type == "q8_0" and data.shape[-1] % 32 == 0:
                q = gguf.GGMLQuantizationType.Q8_0
                data = gguf.quants.dequantize(gguf.quants.quantize(data, q), q)
            else:
                data = data.astype(np.float16).astype(np.float32)
            p.copy_(torch.from_numpy(data))
    return hf


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESIDSCOPE_CACHE", str(tmp_path / "cache"))


def ids():
    return torch.randint(0, len(TOKENS), (2, 24), generator=torch.Generator().manual_seed(0))


CASES = {"gptneox": ("gptneox", {}), "gptneox-serial": ("gptneox", {"use_parallel_residual": False}),
         "gptneox-nobias": ("gptneox", {"attention_bias": False}), "olmo2": ("olmo2", {}),
         "olmo2-bias": ("olmo2", {"attention_bias": True}), "olmo2-tied": ("olmo2", {"tie_word_embeddings": True})}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_loads_with_the_source_models_logits_and_config(case, tmp_path):
    arch, kw = CASES[case]
    hf = make(arch, **kw)
    path = tmp_path / f"tiny-{case}.gguf"
    convert(hf, path, arch)
    model = load_model(path)
    with torch.no_grad():
        assert_close(model(ids()), hf(ids()).logits, atol=1e-4, rtol=1e-4)
    c, cfg = hf.config, model.cfg
    assert (cfg.model_type, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_vocab) == (
        {"gptneox": "gpt_neox"}.get(arch, arch), 2, 64, 4, N_VOCAB)
    if arch == "gptneox":
        assert cfg.parallel == c.use_parallel_residual and cfg.rotary_dim == 4 and cfg.norm_eps == 1e-5
        assert cfg.normalization_type == "LN" and not cfg.default_prepend_bos  # Pythia: no BOS, as TransformerLens
    else:
        assert cfg.n_key_value_heads == 2 and cfg.norm_eps == 1e-6 and cfg.rope["full_attention"].theta == 5000.0
        assert not cfg.default_prepend_bos  # OLMo 2's configs name no BOS (the file's BOS id is its tokenizer's)
    assert model.to_str_tokens(" the a", prepend_bos=False) == [" the", " ", "a"]  # the file's merges


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
@pytest.mark.parametrize("arch", ["gptneox", "olmo2"])
def test_f16_and_q8_0_files_load_as_the_rounded_model(arch, out_type, tmp_path):
    """Matrices stored as f16 / q8_0 (d_model 64: rows of two q8_0 blocks; the MLP's 96-wide rows too) dequantize
    through gguf.quants to exactly the numbers llama.cpp holds: logits equal the source model rounded the same way."""
    import gguf

    hf = make(arch)
    path = tmp_path / f"tiny-{arch}-{out_type}.gguf"
    convert(hf, path, arch, out_type=out_type)
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types == {"F32", out_type.upper()}
    model = load_model(path)
    rounded = as_stored(hf, out_type)
    with torch.no_grad():
        assert_close(model(ids()), rounded(ids()).logits, atol=1e-4, rtol=1e-4)


def test_converted_folder_reloads_in_transformers(tmp_path):
    """The cached folder is a plain transformers checkpoint: AutoModelForCausalLM reads the same model."""
    from transformers import AutoModelForCausalLM

    from residscope.model.gguf import convert_gguf

    hf = make("gptneox")
    path = tmp_path / "tiny-gptneox.gguf"
    convert(hf, path, "gptneox")
    again = AutoModelForCausalLM.from_pretrained(convert_gguf(path)).eval()
    with torch.no_grad():
        assert_close(again(ids()).logits, hf(ids()).logits, atol=1e-5, rtol=1e-5)


def _refused(path, *needles) -> str:
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and all(n in msg for n in needles), msg
    return msg


@pytest.mark.parametrize("arch, key", [("gptneox", "gptneox.use_parallel_residual"),
                                       ("gptneox", "gptneox.rope.dimension_count"),
                                       ("gptneox", "gptneox.attention.layer_norm_epsilon"),
                                       ("olmo2", "olmo2.attention.layer_norm_rms_epsilon"),
                                       ("olmo2", "olmo2.embedding_length")])
def test_a_missing_metadata_key_is_refused_naming_file_and_key(arch, key, tmp_path):
    path = tmp_path / f"no-key-{arch}.gguf"
    convert(make(arch), path, arch, drop_key=key)
    _refused(path, key, "no ")


@pytest.mark.parametrize("arch, tensor", [("gptneox", "blk.1.ffn_up.bias"), ("gptneox", "blk.0.attn_qkv.weight"),
                                          ("olmo2", "blk.0.attn_k_norm.weight"), ("olmo2", "output_norm.weight")])
def test_a_missing_tensor_is_refused_naming_file_and_tensor(arch, tensor, tmp_path):
    path = tmp_path / f"no-tensor-{arch}.gguf"
    convert(make(arch), path, arch, drop_tensor=tensor)
    _refused(path, f"no tensor {tensor}")


def test_what_the_mapping_does_not_read_is_refused(tmp_path):
    """OLMo 3's sliding windows (llama.cpp writes them under the olmo2 architecture) and RoPE scaling would make
    another model: refused naming the key, never dropped."""
    path = tmp_path / "olmo3-as-olmo2.gguf"
    convert(make("olmo2"), path, "olmo2", extra=lambda w: w.add_sliding_window(16))
    _refused(path, "olmo2.attention.sliding_window", "does not read")
    path = tmp_path / "yarn.gguf"
    convert(make("olmo2"), path, "olmo2", extra=lambda w: w.add_rope_scaling_factor(4.0))
    _refused(path, "olmo2.rope.scaling.factor")


def test_contradicting_metadata_is_refused(tmp_path):
    path = tmp_path / "bad-rope-dims.gguf"
    hf = make("gptneox")
    convert(hf, path, "gptneox", drop_key="gptneox.rope.dimension_count",
            extra=lambda w: w.add_rope_dimension_count(5))  # odd: no rotation pairs
    _refused(path, "gptneox.rope.dimension_count=5")
    path = tmp_path / "bad-key-length.gguf"
    convert(make("olmo2"), path, "olmo2", extra=lambda w: w.add_key_length(32))
    _refused(path, "olmo2.attention.key_length=32")


# ---- export: residscope's GGUF writer for the same architectures (the table read the other way) -------------------
@pytest.fixture(scope="module")
def tokenizer():
    from tiny_llama import tiny_tokenizer

    return tiny_tokenizer(300)


def saved(tmp_path, arch: str, tokenizer, **kw):
    """A three-layer source checkpoint with a real byte-level BPE tokenizer (export writes the tokenizer too)."""
    hf = make(arch, vocab_size=len(tokenizer), num_hidden_layers=3, **kw)
    folder = tmp_path / f"src-{arch}"
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return hf, folder


@pytest.mark.parametrize("quant", ["f32", "f16"])
@pytest.mark.parametrize("arch", ["gptneox", "olmo2"])
def test_export_round_trips_through_the_gguf_loader(arch, quant, tmp_path, tokenizer):
    """A pruned model exported as the architecture's GGUF reads back with the in-memory logits (f16: the logits of the
    model with its matrices rounded to f16, which the writer stores exactly)."""
    import gguf

    from residscope.model.gguf_export import write_gguf
    from residscope.surgery import remove_layers

    hf, folder = saved(tmp_path, arch, tokenizer)
    if quant == "f16":
        as_stored(hf, "f16").save_pretrained(folder)
    pruned = remove_layers(load_model(folder), [1])
    out = write_gguf(pruned, tmp_path / f"{arch}-{quant}.gguf", quant=quant)
    fields = {k: f.contents() for k, f in gguf.GGUFReader(out.path).fields.items() if k.startswith(arch)}
    assert fields[f"{arch}.block_count"] == 2 and out.n_layers == 2
    back = load_model(out.path)
    tokens = pruned.to_tokens("The capital of France is Paris.")
    with torch.no_grad():
        assert_close(back(tokens), pruned(tokens), atol=1e-5, rtol=1e-5)
    assert back.to_str_tokens("The capital") == pruned.to_str_tokens("The capital")


def test_export_refuses_what_the_architecture_cannot_say(tmp_path, tokenizer):
    from residscope.model.errors import InputError
    from residscope.model.gguf_export import write_gguf
    from residscope.surgery import remove_sublayers

    _, folder = saved(tmp_path, "gptneox", tokenizer, hidden_act="gelu_new")  # llama.cpp's gptneox: exact GELU only
    with pytest.raises(InputError, match="cannot express hidden_act='gelu_new'") as err:
        write_gguf(load_model(folder), tmp_path / "x.gguf")
    assert "\n" not in str(err.value) and not (tmp_path / "x.gguf").exists()
    _, folder = saved(tmp_path, "olmo2", tokenizer,
                      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})
    with pytest.raises(InputError, match="rope_parameters"):
        write_gguf(load_model(folder), tmp_path / "x.gguf")
    _, folder = saved(tmp_path / "half", "olmo2", tokenizer)
    with pytest.raises(InputError, match="halves"):
        write_gguf(remove_sublayers(load_model(folder), mlp=[0]), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
