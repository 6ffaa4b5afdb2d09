"""Bad checkpoints, one fault each: a one-line error naming the file and the tensor or key, never a silent NaN.

Each case copies `zoo-rope` (4 layers, 5 MB, with a tokenizer) and breaks one thing: a NaN or Inf in a weight, an int8
weight, a config key of the wrong type or range, a non-finite RoPE parameter, a config that is not an object, a file
that cannot be read. GGUF files: truncated, and a cache whose weights were corrupted without changing their size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from residscope.model import load_model
from residscope.model.config import ConfigError
from residscope.model.errors import CheckpointError
from residscope.model.registry import ZOO_DIR

WEIGHTS = "model.safetensors"
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"
NORM = "model.layers.2.input_layernorm.weight"


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.fixture
def zoo_copy(tmp_path) -> Path:
    folder = tmp_path / "zoo-rope-copy"
    shutil.copytree(ZOO_DIR / "rope", folder)
    return folder


def edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))  # json writes NaN / Infinity as Python's json reads them


# ---- tensors ----------------------------------------------------------------------------------------------------------

def test_one_nan_weight_is_refused_naming_file_and_tensor(zoo_copy):
    def one_nan(t):
        t[Q_PROJ][3, 5] = float("nan")

    edit_tensors(zoo_copy, one_nan)
    with pytest.raises(CheckpointError) as e:
        load_model(zoo_copy)
    msg = one_line(e)
    assert str(zoo_copy / WEIGHTS) in msg and repr(Q_PROJ) in msg and "1 NaN or Inf value " in msg
    assert "allow_nonfinite=True" in msg


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_inf_norm_weights_are_refused_in_every_dtype(zoo_copy, dtype):
    def inf_norm(t):
        t[NORM].fill_(float("inf"))

    edit_tensors(zoo_copy, inf_norm)
    with pytest.raises(CheckpointError) as e:
        load_model(zoo_copy, dtype=dtype)
    assert repr(NORM) in one_line(e) and "128 NaN or Inf values" in one_line(e)


def test_allow_nonfinite_loads_the_broken_checkpoint_for_forensics(zoo_copy):
    def one_nan(t):
        t[Q_PROJ][0, 0] = float("nan")

    edit_tensors(zoo_copy, one_nan)
    model = load_model(zoo_copy, allow_nonfinite=True)
    q = model.blocks[1].attn.q_proj.weight
    assert math.isnan(q[0, 0].item()) and int(torch.isnan(q).sum()) == 1


def test_float16_overflow_of_a_finite_checkpoint_is_caught_after_the_cast(zoo_copy):
    """A finite float32 value beyond float16's range becomes Inf when loading as float16: refused, not NaN later."""
    def huge(t):
        t[Q_PROJ][0, 0] = 1e6

    edit_tensors(zoo_copy, huge)
    assert load_model(zoo_copy).blocks[1].attn.q_proj.weight[0, 0].item() == 1e6  # float32: fine
    with pytest.raises(CheckpointError, match=r"NaN or Inf value \(in float16\)"):
        load_model(zoo_copy, dtype="float16")


def test_finite_weights_whose_float16_sum_overflows_still_load(tmp_path):
    """The fast check sums each tensor; a sum that overflows although every value is finite must not be refused."""
    from tiny_llama import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "tiny", n_layers=1)
    edit_tensors(folder, lambda t: t["model.embed_tokens.weight"].fill_(60000.0))  # 60000 fits float16; the sum does not
    model = load_model(folder, dtype="float16")
    assert float(model.embed.weight.detach().max()) == 60000.0


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool])
def test_integer_weight_is_refused_naming_tensor_and_dtype(zoo_copy, dtype):
    def to_int(t):
        t[Q_PROJ] = (t[Q_PROJ] * 100).to(dtype)

    edit_tensors(zoo_copy, to_int)
    with pytest.raises(CheckpointError) as e:
        load_model(zoo_copy)
    msg = one_line(e)
    assert repr(Q_PROJ) in msg and f"dtype {str(dtype).removeprefix('torch.')}" in msg and str(zoo_copy / WEIGHTS) in msg


def test_offloaded_loading_refuses_integer_blocks_and_nan_embeddings(zoo_copy):
    edit_tensors(zoo_copy, lambda t: t.__setitem__(Q_PROJ, t[Q_PROJ].to(torch.int8)))
    with pytest.raises(CheckpointError, match=rf"{Q_PROJ!r} has dtype int8"):
        load_model(zoo_copy, offload=True)
    edit_tensors(zoo_copy, lambda t: t.__setitem__(Q_PROJ, t[Q_PROJ].float()))
    edit_tensors(zoo_copy, lambda t: t["model.embed_tokens.weight"].__setitem__((7, 7), float("inf")))
    with pytest.raises(CheckpointError, match="'model.embed_tokens.weight' holds 1 NaN or Inf value"):
        load_model(zoo_copy, offload=True)


def test_offloaded_block_with_nan_is_refused_when_it_streams_and_allowed_on_request(zoo_copy):
    """Streamed blocks are read during the forward, so their NaN check happens there (in the reader thread)."""
    edit_tensors(zoo_copy, lambda t: t[Q_PROJ].__setitem__((2, 3), float("nan")))
    ids = torch.tensor([[1, 2, 3, 4]])
    model = load_model(zoo_copy, offload=True)  # the block is not read yet: loading succeeds
    with pytest.raises(CheckpointError) as e:
        model(ids)
    assert str(zoo_copy / WEIGHTS) in one_line(e) and f"{Q_PROJ!r} holds 1 NaN or Inf value " in one_line(e)
    # the forensic load computes with the broken weight, as the in-memory forensic load does
    logits, cache = load_model(zoo_copy, offload=True, allow_nonfinite=True).run_with_cache(ids)
    assert int(torch.isnan(cache["blocks.1.attn.hook_q"]).sum()) == ids.shape[1]  # one NaN coordinate per query
    expected, _ = load_model(zoo_copy, allow_nonfinite=True).run_with_cache(ids)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0, equal_nan=True)


def test_cli_allow_nonfinite_flag_reaches_the_loader(zoo_copy, monkeypatch, capsys):
    from conftest import run_cli
    from residscope.apps.cli_common import ALLOW_NONFINITE_ENV

    def run(*argv: str) -> tuple[int, str]:
        code, _, err = run_cli(argv, capsys)
        return code, err.strip()

    monkeypatch.setenv(ALLOW_NONFINITE_ENV, "0")  # restored (removed) after the test: the flag sets it in-process
    edit_tensors(zoo_copy, lambda t: t[Q_PROJ].__setitem__((0, 0), float("nan")))
    code, err = run("generate", "--model", str(zoo_copy), "--max-new-tokens", "1", "a b")
    assert code == 2 and "\n" not in err and "--allow-nonfinite" in err and repr(Q_PROJ) in err
    code, err = run("--allow-nonfinite", "generate", "--model", str(zoo_copy), "--max-new-tokens", "1", "a b")
    assert code == 0, err
    code, err = run("generate", "--model", str(zoo_copy), "--max-new-tokens", "1", "a b")
    assert code == 2 and repr(Q_PROJ) in err  # the flag does not outlive its run


# ---- config.json ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [
    ("rope_theta", float("nan")), ("rope_theta", float("inf")), ("rope_theta", 0), ("rope_theta", -10000.0),
    ("rope_theta", "10000"),
])
def test_bad_rope_base_is_refused_naming_the_key(zoo_copy, key, value):
    edit_config(zoo_copy, **{key: value})
    with pytest.raises(ConfigError) as e:
        load_model(zoo_copy)
    msg = one_line(e)
    assert str(zoo_copy / "config.json") in msg and key in msg


@pytest.mark.parametrize("scaling, key", [
    ({"rope_type": "linear", "factor": float("nan")}, "factor"),
    ({"rope_type": "linear", "factor": 0}, "factor"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": float("inf")}, "beta_fast"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": -1}, "original_max_position_embeddings"),
    ({"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 128, "low_freq_factor": 2.0,
      "high_freq_factor": 2.0}, "high_freq_factor"),
])
def test_bad_rope_scaling_parameters_are_refused_naming_the_key(zoo_copy, scaling, key):
    edit_config(zoo_copy, rope_scaling=scaling)
    with pytest.raises(ConfigError) as e:
        load_model(zoo_copy)
    assert key in one_line(e)


@pytest.mark.parametrize("key, value", [
    ("hidden_size", "big"), ("num_hidden_layers", -2), ("num_attention_heads", 0), ("num_key_value_heads", 0),
    ("intermediate_size", 384.5), ("vocab_size", True), ("head_dim", 0), ("max_position_embeddings", 0),
    ("rms_norm_eps", float("nan")), ("hidden_size", None),
])
def test_core_config_keys_are_checked_by_type_and_range(zoo_copy, key, value):
    edit_config(zoo_copy, **{key: value})
    with pytest.raises(ConfigError) as e:
        load_model(zoo_copy)
    msg = one_line(e)
    assert str(zoo_copy / "config.json") in msg and key in msg


def test_zero_heads_without_head_dim_is_a_config_error_not_a_division_by_zero(zoo_copy):
    edit_config(zoo_copy, num_attention_heads=0, head_dim=...)
    with pytest.raises(ConfigError, match="num_attention_heads must be a positive integer, got 0"):
        load_model(zoo_copy)


@pytest.mark.parametrize("content", ["[1, 2, 3]", '"llama"', "null", "\xff\xfe not text"])
def test_config_that_is_not_an_object_is_refused(zoo_copy, content):
    (zoo_copy / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_model(zoo_copy)
    assert str(zoo_copy / "config.json") in one_line(e)


# ---- files that cannot be read ----------------------------------------------------------------------------------------

def _in_unprivileged_child(fn) -> str:
    """fn()'s exception as "Class: message", run in a forked child that drops root (root reads any file whatever its
    mode bits, and CI runs as root)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no torch threads are needed before the error, only file system calls
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)  # nobody
            try:
                fn()
                out = "no error"
            except Exception as e:  # noqa: BLE001 - reported to the parent
                out = f"{type(e).__name__}: {e}"
            os.write(write, out.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


@pytest.fixture
def shared_copy():
    """A zoo-rope copy in a folder the unprivileged child can reach (pytest's tmp_path is private to root)."""
    parent = Path(tempfile.mkdtemp(prefix="residscope-perm-"))
    parent.chmod(0o755)
    folder = parent / "zoo-rope-copy"
    shutil.copytree(ZOO_DIR / "rope", folder)
    for p in [folder, *folder.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    yield folder
    folder.chmod(0o755)
    shutil.rmtree(parent)


@pytest.mark.parametrize("target", [".", WEIGHTS, "config.json", "gguf"])
def test_permission_denied_is_one_line_naming_the_file(shared_copy, tiny_gguf, target):
    source = shared_copy
    if target == "gguf":
        source = shared_copy.parent / "tiny.gguf"
        shutil.copy(tiny_gguf[0], source)
    culprit = source if target in (".", "gguf") else shared_copy / target
    culprit.chmod(0)
    out = _in_unprivileged_child(lambda: load_model(source, load_tokenizer=False))
    assert out.startswith(("CheckpointError: ", "ConfigError: ")), out
    assert "permission denied" in out and "\n" not in out
    assert str(culprit) in out


# ---- GGUF -------------------------------------------------------------------------------------------------------------

@pytest.fixture
def gguf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESIDSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from test_gguf import write_tiny_llama_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_llama_gguf(path)


@pytest.mark.parametrize("size", [0, 3, 100, 3000])
def test_truncated_gguf_is_one_line_naming_the_file(tiny_gguf, gguf_cache, tmp_path, size):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf[0].read_bytes()[:size])
    with pytest.raises(CheckpointError) as e:
        load_model(cut)
    assert str(cut) in one_line(e)
    assert not (gguf_cache / "gguf").exists() or not list((gguf_cache / "gguf").iterdir())  # nothing half-written


def test_same_size_corruption_of_the_gguf_cache_is_detected_and_rebuilt(tiny_gguf, gguf_cache, caplog):
    from residscope.model.gguf import cache_problem, convert_gguf

    path, reference = tiny_gguf
    folder = convert_gguf(path)
    weights = folder / WEIGHTS
    size = weights.stat().st_size
    header_len = struct.unpack("<Q", weights.read_bytes()[:8])[0]
    with weights.open("r+b") as f:  # NaN bit patterns over the first tensor's data, same size
        f.seek(8 + header_len)
        f.write(b"\xff\xff\xff\x7f" * 64)
    assert weights.stat().st_size == size and cache_problem(folder) is None  # the size check alone misses it
    assert "sha256" in cache_problem(folder, full=True)

    with caplog.at_level("WARNING", logger="residscope.model.gguf"):
        model = load_model(path, load_tokenizer=False)
    assert "rebuilding" in caplog.text and "sha256" in caplog.text
    assert cache_problem(folder, full=True) is None
    torch.testing.assert_close(model.embed.weight, reference.model.embed_tokens.weight.detach(), rtol=0, atol=0)
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]


def test_gguf_cache_is_hashed_again_only_after_its_files_change(tiny_gguf, gguf_cache, monkeypatch):
    """A verified file keeps its stat stamp and is not re-hashed; any write moves its ctime, so it is hashed again."""
    import time

    from residscope.model import gguf

    path, _ = tiny_gguf
    folder = gguf.convert_gguf(path)
    hashed = []
    real_sha = gguf._sha256_file
    monkeypatch.setattr(gguf, "_sha256_file", lambda p: hashed.append(p.name) or real_sha(p))
    assert gguf.convert_gguf(path) == folder and WEIGHTS in hashed  # just written: hashed, but too fresh to stamp
    hashed.clear()
    assert gguf.convert_gguf(path) == folder and WEIGHTS in hashed
    monkeypatch.setattr(gguf, "_RACY_SECONDS", 0.0)  # instead of waiting a few seconds for the ctime to age
    hashed.clear()
    gguf.convert_gguf(path)
    assert WEIGHTS in hashed and WEIGHTS in json.loads((folder / gguf.VERIFIED).read_text())
    hashed.clear()
    gguf.convert_gguf(path)
    assert hashed == []  # stamps unchanged: nothing hashed
    time.sleep(0.05)  # a later clock tick than the stamp's ctime
    with (folder / WEIGHTS).open("r+b") as f:  # same size, same bytes even: the write alone moves ctime
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(byte)
    gguf.convert_gguf(path)
    assert hashed == [WEIGHTS]


# ---- through the CLI: exit code 2, one line -------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["nan-weight", "rope-theta-nan", "hidden-size-big", "config-list"])
def test_cli_refuses_broken_checkpoints_with_exit_2_and_one_line(zoo_copy, fault, capsys):
    from residscope.apps.cli import main

    if fault == "nan-weight":
        edit_tensors(zoo_copy, lambda t: t[Q_PROJ].__setitem__((0, 0), float("nan")))
        culprit = Q_PROJ
    elif fault == "rope-theta-nan":
        edit_config(zoo_copy, rope_theta=float("nan"))
        culprit = "rope_theta"
    elif fault == "hidden-size-big":
        edit_config(zoo_copy, hidden_size="big")
        culprit = "hidden_size"
    else:
        (zoo_copy / "config.json").write_text("[]")
        culprit = "config.json"
    with pytest.raises(SystemExit) as e:
        main(["ppl", "--model", str(zoo_copy), "--seq-len", "64", "--samples", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("residscope: error: ") and culprit in err


# ---- issue 24: shard indexes and safetensors headers that lie --------------------------------------------------------
def shard(folder: Path) -> dict[str, str]:
    """Split model.safetensors into two shards with an index (the layout of any large Hugging Face checkpoint)."""
    tensors = load_file(folder / WEIGHTS)
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (folder / WEIGHTS).unlink()
    write_index(folder, weight_map)
    return weight_map


def write_index(folder: Path, weight_map, *, raw: str | None = None) -> None:
    text = raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map})
    (folder / "model.safetensors.index.json").write_text(text)


def test_a_sharded_checkpoint_loads_as_the_single_file(zoo_copy):
    reference = load_model(zoo_copy)
    shard(zoo_copy)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(load_model(zoo_copy)(ids), reference(ids), rtol=0, atol=0)


@pytest.mark.parametrize("weight_map, culprit", [
    ([], "weight_map must be a non-empty object"),
    ({}, "weight_map must be a non-empty object"),
    ({Q_PROJ: None}, f"weight_map[{Q_PROJ!r}] must be a shard file name"),
    ({Q_PROJ: 3}, "must be a shard file name"),
    ({Q_PROJ: "../elsewhere.safetensors"}, "must be a shard file name in this folder"),
])
def test_malformed_weight_map_is_one_line(zoo_copy, weight_map, culprit):
    shard(zoo_copy)
    write_index(zoo_copy, weight_map)
    with pytest.raises(CheckpointError) as e:
        load_model(zoo_copy)
    assert culprit in one_line(e) and "model.safetensors.index.json" in one_line(e)


def test_a_tensor_listed_twice_in_the_index_is_refused(zoo_copy):
    weight_map = shard(zoo_copy)
    body = json.dumps({"weight_map": weight_map})
    other = "model-00001-of-00002.safetensors" if weight_map[Q_PROJ].startswith("model-00002") else "model-00002-of-00002.safetensors"
    write_index(zoo_copy, None, raw=body[:-2] + f', "{Q_PROJ}": "{other}"' + "}}")
    with pytest.raises(CheckpointError, match=f"key {Q_PROJ!r} appears twice"):
        load_model(zoo_copy)


def test_a_tensor_in_two_shard_files_is_refused(zoo_copy):
    weight_map = shard(zoo_copy)
    first = zoo_copy / "model-00001-of-00002.safetensors"
    tensors = load_file(first)
    elsewhere = next(n for n, f in weight_map.items() if f != first.name)
    tensors[elsewhere] = torch.zeros_like(load_file(zoo_copy / weight_map[elsewhere])[elsewhere])
    save_file(tensors, first, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_model(zoo_copy, offload=True)  # both loading paths read the file list through model/shards.py
    assert repr(elsewhere) in one_line(e) and "one shard only" in one_line(e)


def test_an_index_that_misplaces_a_tensor_is_refused(zoo_copy):
    weight_map = shard(zoo_copy)
    weight_map[Q_PROJ] = next(f for f in set(weight_map.values()) if f != weight_map[Q_PROJ])
    write_index(zoo_copy, weight_map)
    with pytest.raises(CheckpointError, match=f"weight_map puts {Q_PROJ!r} in"):
        load_model(zoo_copy)


def rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = edit(header, raw[8 + n:])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize("fault, culprit", [
    ("overlap", "overlaps the bytes of another tensor"),
    ("trailing", "bytes after the last tensor belong to no tensor"),
])
def test_safetensors_byte_ranges_must_tile_the_file_like_the_library_says(zoo_copy, fault, culprit):
    from safetensors import SafetensorError

    def overlap(header, data):  # Q_PROJ's range moved onto its neighbour's: the file keeps its size
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        i = names.index(Q_PROJ)
        begin = header[names[i - 1]]["data_offsets"][0]
        size = header[Q_PROJ]["data_offsets"][1] - header[Q_PROJ]["data_offsets"][0]
        header[Q_PROJ]["data_offsets"] = [begin, begin + size]
        return data

    rewrite_header(zoo_copy / WEIGHTS, overlap if fault == "overlap" else lambda h, d: d + b"\0" * 16)
    with pytest.raises(SafetensorError):  # the reference reader refuses it too
        load_file(zoo_copy / WEIGHTS)
    with pytest.raises(CheckpointError) as e:
        load_model(zoo_copy)
    assert culprit in one_line(e) and str(zoo_copy / WEIGHTS) in one_line(e)


def test_absurd_header_length_is_refused(zoo_copy):
    path = zoo_copy / WEIGHTS
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    with pytest.raises(CheckpointError, match="header length .* exceeds the file"):
        load_model(zoo_copy)


# ---- issue 24: config keys read before the tokenizer and the weights -------------------------------------------------
@pytest.mark.parametrize("changes, culprit", [
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config (quant_method 'gptq') is not implemented"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling: rope_type 'linear' needs 'factor'"),
    ({"rope_scaling": {"type": "dynamic"}}, "rope_type 'dynamic' needs 'factor'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs 'low_freq_factor'"),
    ({"eos_token_id": "2"}, "eos_token_id must be an integer id >= 0 or a list of them"),
    ({"eos_token_id": [1, "2"]}, "eos_token_id"),
    ({"bos_token_id": 1.5}, "bos_token_id must be an integer id >= 0"),
    ({"pad_token_id": -1}, "pad_token_id"),
    ({"vocab_size": 1000}, "vocab_size 1000 is smaller than the tokenizer's 2048 tokens"),
])
def test_config_keys_transformers_would_catch_are_named(zoo_copy, changes, culprit):
    edit_config(zoo_copy, **changes)
    with pytest.raises(ConfigError if "vocab_size" not in changes else CheckpointError) as e:
        load_model(zoo_copy)
    assert culprit in one_line(e) and str(zoo_copy / "config.json") in one_line(e)


@pytest.mark.parametrize("name, damage, culprit", [
    ("tokenizer.json", lambda text: text[:3000], "not valid JSON (truncated?)"),
    ("tokenizer_config.json", lambda text: "[1, 2]", "expected a JSON object"),
    ("tokenizer.json", lambda text: json.dumps({"version": "1.0", "model": {"type": "Banana"}}), "the tokenizer cannot be loaded"),
])
def test_tokenizer_files_that_fail_are_named_with_the_reason(zoo_copy, name, damage, culprit):
    path = zoo_copy / name
    path.write_text(damage(path.read_text()))
    with pytest.raises(CheckpointError) as e:
        load_model(zoo_copy)
    assert culprit in one_line(e) and str(zoo_copy) in one_line(e)
    load_model(zoo_copy, load_tokenizer=False)  # the weights still load on request


def test_cli_names_the_tokenizer_file(zoo_copy, capsys):
    from conftest import run_cli as cli
    from test_bad_inputs import assert_one_line_error

    path = zoo_copy / "tokenizer.json"
    path.write_text(path.read_text()[:3000])
    assert_one_line_error(cli(["ppl", "--model", zoo_copy, "--seq-len", "16", "--samples", "2"], capsys),
                          str(path), "truncated")


# ---- issue 24: a tied config whose file holds a different lm_head ----------------------------------------------------
@pytest.fixture
def tied_but_different(tmp_path) -> Path:
    from tiny_llama import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "tied", n_layers=2)
    torch.manual_seed(1)
    edit_tensors(folder, lambda t: t.__setitem__("lm_head.weight", torch.randn_like(t["model.embed_tokens.weight"])))
    return folder


@pytest.mark.parametrize("offload", [False, True])
def test_tied_config_with_a_different_lm_head_loads_untied_like_transformers(tied_but_different, offload):
    import transformers

    from residscope.model.tying import TiedHeadWarning

    with pytest.warns(TiedHeadWarning, match="tie_word_embeddings=true but lm_head.weight differs"):
        model = load_model(tied_but_different, offload=offload)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tied_but_different).eval()
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():  # float32 rounding only: a tied lm_head would differ by about 25
        torch.testing.assert_close(model(ids), reference(ids).logits, rtol=1e-5, atol=1e-5)
    assert not model.cfg.tie_embeddings


def test_an_untied_export_writes_lm_head_and_says_untied(tied_but_different, tmp_path, recwarn):
    model = load_model(tied_but_different)
    out = model.save_pretrained(tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(out / WEIGHTS)
    again = load_model(out)
    ids = torch.tensor([[1, 5, 9]])
    torch.testing.assert_close(again(ids), model(ids))


def test_tied_config_with_an_equal_lm_head_stays_tied(tmp_path):
    from tiny_llama import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "tied", n_layers=1)
    edit_tensors(folder, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    model = load_model(folder)
    assert model.cfg.tie_embeddings and model.unembed.weight is model.embed.weight


# ---- issue 24: offload reads at offsets taken at load: only from the same file ---------------------------------------
def test_offload_stops_when_the_file_changed_since_load(zoo_copy):
    model = load_model(zoo_copy, offload=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    model(ids)
    tensors = load_file(zoo_copy / WEIGHTS)
    save_file(dict(reversed(list(tensors.items()))), zoo_copy / WEIGHTS, metadata={"format": "pt"})  # same weights
    with pytest.raises(CheckpointError) as e:
        model(ids)
    assert str(zoo_copy / WEIGHTS) in one_line(e) and "changed since the model was loaded" in one_line(e)


def test_offload_stops_when_a_hook_rewrites_the_file_mid_forward(zoo_copy):
    model = load_model(zoo_copy, offload=True)
    tensors = load_file(zoo_copy / WEIGHTS)

    def rewrite(x, hook):
        save_file(tensors, zoo_copy / WEIGHTS, metadata={"format": "pt"})
        return x

    with pytest.raises(CheckpointError, match="changed since the model was loaded"):
        model.run_with_hooks(torch.tensor([[1, 2, 3]]), fwd_hooks=[("blocks.1.hook_resid_pre", rewrite)])
