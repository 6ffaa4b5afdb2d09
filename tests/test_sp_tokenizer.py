"""Baichuan 2's tokenizer without remote code (model/sp_tokenizer.py).

A tiny sentencepiece BPE model is trained here on pydoc_data.topics with Baichuan 2's trainer settings (identity
normalisation, no dummy prefix, split digits, byte fallback, whitespace-only pieces, <unk>/<s>/</s> at 0/1/2) and put
in a Baichuan-style folder: tokenizer.model, the tokenizer_config.json keys Baichuan 2 ships (auto_map and
tokenizer_class naming the remote class, add_bos_token/add_eos_token false, pad "<unk>") and decoy remote-code files
that leave a marker file if anything ever imports them.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import pickle
from pathlib import Path

import pytest

from residscope.model.errors import CheckpointError
import sentencepiece as spm
import torch
from pydoc_data.topics import topics
from safetensors.torch import save_file

from residscope.model.loading import load_model, load_tokenizer_from
from residscope.model.sp_tokenizer import BaichuanTokenizer, is_baichuan_tokenizer_folder, names_baichuan_tokenizer

VOCAB = 400
MARKER = "REMOTE_CODE_RAN"
REMOTE_FILES = ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py")
TRAIN_TOPICS = ("assignment", "class", "for", "if", "import", "lambda", "while", "with")
TEXTS = [
    topics["try"][:600],  # held-out English/code text
    "  two leading spaces, trailing tab\t",
    "digits 1234567890 and 3.14159 split one by one",
    "Unicode: ñ, 中文字符, emoji 😀 fall back to bytes",
    "line one\nline two\n\n    indented code()\n",
    "x",
]


def added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


BAICHUAN_TOKENIZER_CONFIG = {
    "add_bos_token": False,
    "add_eos_token": False,
    "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
    "bos_token": added_token("<s>"),
    "eos_token": added_token("</s>"),
    "unk_token": added_token("<unk>"),
    "pad_token": added_token("<unk>"),
    "clean_up_tokenization_spaces": False,
    "model_max_length": 4096,
    "sp_model_kwargs": {},
    "tokenizer_class": "BaichuanTokenizer",
    "use_fast": False,
}


def train_sentencepiece() -> bytes:
    lines = [line for name in TRAIN_TOPICS for line in topics[name].splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=VOCAB, model_type="bpe",
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        split_digits=True, byte_fallback=True, allow_whitespace_only_pieces=True, character_coverage=0.9999,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def baichuan_config(vocab: int) -> dict:
    """A tiny 7B-style (RoPE) Baichuan 2 config.json with Baichuan's own keys."""
    return {
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "model_type": "baichuan", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 2, "vocab_size": vocab, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "max_position_embeddings": 4096, "model_max_length": 4096, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16",
    }


def random_weights(hp: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    H, F, V = hp["hidden_size"], hp["intermediate_size"], hp["vocab_size"]
    sd = {"model.embed_tokens.weight": torch.randn(V, H, generator=g), "model.norm.weight": torch.ones(H),
          "lm_head.weight": torch.randn(V, H, generator=g)}
    for i in range(hp["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(H)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(H)
        sd[p + "self_attn.W_pack.weight"] = torch.randn(3 * H, H, generator=g) / H**0.5
        sd[p + "self_attn.o_proj.weight"] = torch.randn(H, H, generator=g) / H**0.5
        sd[p + "mlp.gate_proj.weight"] = torch.randn(F, H, generator=g) / H**0.5
        sd[p + "mlp.up_proj.weight"] = torch.randn(F, H, generator=g) / H**0.5
        sd[p + "mlp.down_proj.weight"] = torch.randn(H, F, generator=g) / F**0.5
    return sd


def write_folder(folder: Path, proto: bytes, tokenizer_config: dict | None = BAICHUAN_TOKENIZER_CONFIG,
                 with_weights: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(proto)
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    hp = baichuan_config(VOCAB)
    (folder / "config.json").write_text(json.dumps(hp, indent=2))
    if with_weights:
        save_file(random_weights(hp), str(folder / "model.safetensors"))
    for name in REMOTE_FILES:  # if anything imported these, the marker would appear
        (folder / name).write_text(
            f"import pathlib\npathlib.Path(__file__).with_name({MARKER!r}).write_text(__name__)\n"
            "raise RuntimeError('remote code must never run')\n"
        )
    return folder


def assert_no_remote_code(*folders: Path) -> None:
    for folder in folders:
        assert not (folder / MARKER).exists(), f"remote code ran in {folder}"


@pytest.fixture(scope="module")
def proto() -> bytes:
    return train_sentencepiece()


@pytest.fixture(scope="module")
def sp(proto) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=proto)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, proto) -> Path:
    return write_folder(tmp_path_factory.mktemp("baichuan_tok") / "ckpt", proto, with_weights=True)


@pytest.fixture(scope="module")
def tok(folder) -> BaichuanTokenizer:
    t = load_tokenizer_from(folder)
    assert isinstance(t, BaichuanTokenizer)
    return t


# ---------------------------------------------------------------------------------------------------------------------
def test_trained_model_has_baichuan_settings(sp, proto):
    """The test model must exercise what Baichuan 2's does: no dummy prefix, identity normalisation, byte fallback."""
    assert sp.get_piece_size() == VOCAB
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.encode("Hello", out_type=str)[0] != "▁Hello"[:1]  # no "▁" prepended
    assert sp.decode(sp.encode("  a\tb  ")) == "  a\tb  "  # whitespace kept as is
    assert "<0xE4>" in sp.encode("中", out_type=str)  # byte fallback for unseen characters
    assert sp.encode("123", out_type=str) == ["1", "2", "3"]


def test_ids_equal_sentencepiece(tok, sp, folder):
    for text in TEXTS:
        assert tok.tokenize(text) == sp.encode(text, out_type=str)
        # Baichuan 2's config: neither BOS nor EOS
        assert tok(text)["input_ids"] == sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert tok(TEXTS)["input_ids"] == [sp.encode(t) for t in TEXTS]  # a batch, unpadded
    assert_no_remote_code(folder)


def test_bos_eos_follow_config_then_class_defaults(tmp_path, proto, sp, folder):
    text = TEXTS[0]
    ids = sp.encode(text)
    both = BaichuanTokenizer.from_pretrained(str(folder), add_bos_token=True, add_eos_token=True)
    assert both(text)["input_ids"] == [1] + ids + [2]
    assert both(text, add_special_tokens=False)["input_ids"] == ids
    assert both(text, "x")["input_ids"] == [1] + ids + [2, 1] + sp.encode("x") + [2]
    assert both(text, return_special_tokens_mask=True)["special_tokens_mask"] == [1] + [0] * len(ids) + [1]
    assert both.num_special_tokens_to_add() == 2
    # a config without add_bos_token / add_eos_token: the class defaults of Baichuan's code, BOS yes, EOS no
    bare = {k: v for k, v in BAICHUAN_TOKENIZER_CONFIG.items() if k not in ("add_bos_token", "add_eos_token")}
    defaults = load_tokenizer_from(write_folder(tmp_path / "defaults", proto, bare))
    assert isinstance(defaults, BaichuanTokenizer) and defaults.add_bos_token and not defaults.add_eos_token
    assert defaults(text)["input_ids"] == [1] + ids
    assert_no_remote_code(folder, tmp_path / "defaults")


def test_decode_round_trip_and_special_tokens(tok, sp):
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text == sp.decode(ids)
    assert tok.decode(tok(TEXTS)["input_ids"]) == TEXTS  # batch decode
    # special tokens: the reference's rule (verbatim text; one after ordinary text puts a space before that text)
    hi = sp.encode("Hi there")
    assert tok.decode([1] + hi) == "<s>Hi there"
    assert tok.decode(hi + [2]) == " Hi there</s>"
    assert tok.decode([1] + hi + [2], skip_special_tokens=True) == "Hi there"
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 0)
    assert len(tok) == tok.vocab_size == VOCAB  # special tokens are in the sentencepiece vocabulary, nothing added
    assert tok.get_vocab() == {sp.id_to_piece(i): i for i in range(VOCAB)}
    # a special token's text in the input becomes its id, as with Baichuan's own class (transformers splits it out)
    assert tok("a </s> b")["input_ids"] == sp.encode("a ") + [2] + sp.encode(" b")
    assert tok.convert_ids_to_tokens(sp.encode("ab1")) == sp.encode("ab1", out_type=str)


def test_padding_a_batch(tok, sp):
    texts = ["short", TEXTS[2], "a bit longer than short"]
    rows = [sp.encode(t) for t in texts]
    n = max(map(len, rows))
    batch = tok(texts, padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (3, n)
    for row, ids, mask in zip(rows, batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        assert ids == row + [0] * (n - len(row))  # right padding with <unk> (id 0), like Baichuan 2
        assert mask == [1] * len(row) + [0] * (n - len(row))
    left = tok(texts, padding="max_length", max_length=n + 2, padding_side="left")["input_ids"]
    assert [r[n + 2 - len(row):] for r, row in zip(left, rows)] == rows and left[0][0] == 0
    cut = tok(texts, truncation=True, max_length=3)["input_ids"]
    assert cut == [row[:3] for row in rows]


def test_save_reload_and_pickle(tok, sp, tmp_path, folder):
    out = tmp_path / "saved"
    tok.save_pretrained(out)
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "BaichuanTokenizer"
    assert saved["add_bos_token"] is False and saved["add_eos_token"] is False  # kept, though transformers drops them
    assert (out / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()
    assert not list(out.glob("*.py")) and not list(out.glob(".*tmp*"))
    for again in (load_tokenizer_from(out), BaichuanTokenizer.from_pretrained(str(out))):
        assert isinstance(again, BaichuanTokenizer)
        assert again(TEXTS)["input_ids"] == [sp.encode(t) for t in TEXTS]
        assert (again.pad_token_id, again.add_bos_token, again.add_eos_token) == (0, False, False)
    with_bos = BaichuanTokenizer.from_pretrained(str(folder), add_bos_token=True)
    with_bos.save_pretrained(tmp_path / "saved_bos")
    assert BaichuanTokenizer.from_pretrained(str(tmp_path / "saved_bos"))("x")["input_ids"] == [1] + sp.encode("x")
    for clone in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):
        assert clone(TEXTS[0])["input_ids"] == sp.encode(TEXTS[0]) and clone.decode(sp.encode("ab")) == "ab"
    assert_no_remote_code(folder, out)


def test_which_folders_get_the_adapter(tmp_path, proto, caplog):
    cfg = BAICHUAN_TOKENIZER_CONFIG
    assert names_baichuan_tokenizer(cfg)
    assert names_baichuan_tokenizer({"tokenizer_class": "BaichuanTokenizer"})
    assert names_baichuan_tokenizer({"auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]}})
    assert names_baichuan_tokenizer({"auto_map": ["tokenization_baichuan.BaichuanTokenizer", None]})  # old list form
    assert not names_baichuan_tokenizer({"tokenizer_class": "LlamaTokenizer"})
    assert not names_baichuan_tokenizer({"auto_map": {"AutoTokenizer": ["x.BaichuanTokenizerLike", None]}})

    only_auto_map = write_folder(tmp_path / "auto_map", proto, {"auto_map": cfg["auto_map"], "add_bos_token": False})
    only_model_type = write_folder(tmp_path / "model_type", proto, None)  # config.json says baichuan, no tokenizer config
    assert is_baichuan_tokenizer_folder(only_auto_map) and is_baichuan_tokenizer_folder(only_model_type)
    assert isinstance(load_tokenizer_from(only_auto_map), BaichuanTokenizer)
    assert isinstance(load_tokenizer_from(only_model_type), BaichuanTokenizer)
    # another tokenizer class named explicitly wins over model_type; no tokenizer.model, no adapter
    other = write_folder(tmp_path / "other", proto, {"tokenizer_class": "LlamaTokenizer"})
    assert not is_baichuan_tokenizer_folder(other)
    no_model = write_folder(tmp_path / "no_model", proto, cfg)
    (no_model / "tokenizer.model").unlink()
    assert not is_baichuan_tokenizer_folder(no_model)
    # a broken tokenizer.model: one line naming the file and why (not a model silently without its tokenizer)
    broken = write_folder(tmp_path / "broken", b"not a sentencepiece model", cfg)
    with pytest.raises(CheckpointError, match=r"broken/tokenizer\.model: the tokenizer cannot be loaded") as e:
        load_tokenizer_from(broken)
    assert "\n" not in str(e.value)
    assert_no_remote_code(only_auto_map, only_model_type, other, no_model, broken)


def test_load_model_gets_the_tokenizer(folder, sp):
    model = load_model(folder)
    assert isinstance(model.tokenizer, BaichuanTokenizer)
    text = TEXTS[0]
    tokens = model.to_tokens(text, prepend_bos=False)
    assert tokens.tolist() == [sp.encode(text)]
    # by default BOS goes in front (Baichuan 2's tokenizer does not add it; TransformerLens prepends it for Baichuan)
    assert model.to_tokens(text).tolist() == [[model.tokenizer.bos_token_id] + sp.encode(text)]
    logits = model(tokens)
    assert logits.shape == (1, tokens.shape[1], VOCAB) and torch.isfinite(logits).all()
    assert model.to_string(tokens[0]) == text
    assert model.to_tokens(["123", "456"], prepend_bos=False).tolist() == [[sp.piece_to_id(c) for c in s] for s in ("123", "456")]
    assert_no_remote_code(folder)
