"""Baichuan 2's tokenizer without its remote code: a `transformers.PreTrainedTokenizer` over a sentencepiece model.

Baichuan 2 checkpoints ship `tokenizer.model` and a `tokenizer_config.json` whose `tokenizer_class` / `auto_map` name the
remote-code class `BaichuanTokenizer` (`tokenization_baichuan.py`). residscope never runs remote code, so this module
re-implements that class from its public source:

    _tokenize                       sp_model.encode(text, out_type=str)   (no text preprocessing of its own)
    _convert_token_to_id / _to_token piece_to_id / IdToPiece
    build_inputs_with_special_tokens [bos] a [eos] ([bos] b [eos]), each per add_bos_token / add_eos_token
    convert_tokens_to_string        sentencepiece decode between special tokens, special tokens kept verbatim; the
                                    reference's quirk is kept: a special token after ordinary text adds a space in
                                    front of that text (decode(ids("Hi") + [eos]) == " Hi</s>")
    defaults                        unk "<unk>", bos "<s>", eos "</s>", pad None, add_bos_token=True,
                                    add_eos_token=False, clean_up_tokenization_spaces=False;
                                    the folder's tokenizer_config.json overrides them (Baichuan 2: no BOS, no EOS,
                                    pad "<unk>")

Everything sentencepiece does (normalisation, dummy prefix, digit splitting, byte fallback) comes from the model proto
itself, so it is exactly what Baichuan's own class gets. Special-token strings inside the text ("<s>", "</s>") are split
out by transformers' added-token trie before sentencepiece sees the text, as they are for the remote class.

Nothing in the checkpoint folder is imported: `from_pretrained` reads tokenizer_config.json (JSON) and tokenizer.model
(a protobuf) only.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import sentencepiece as spm
from transformers import AddedToken, PreTrainedTokenizer

from residscope.common.atomic import atomic_write, atomic_write_text

from .errors import InputError

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}
REMOTE_CLASS = "BaichuanTokenizer"


def _as_added_token(token):
    """Special tokens as Baichuan declares them: no stripping on either side."""
    return AddedToken(token, lstrip=False, rstrip=False) if isinstance(token, str) else token


class BaichuanTokenizer(PreTrainedTokenizer):
    """Baichuan 2's `BaichuanTokenizer`, rebuilt on `transformers.PreTrainedTokenizer` (named like the remote class so
    that `save_pretrained` writes `tokenizer_class: BaichuanTokenizer` and the saved folder reloads the same way)."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        sp_model_kwargs: dict[str, Any] | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ):
        self.sp_model_kwargs = {} if sp_model_kwargs is None else dict(sp_model_kwargs)
        self.vocab_file = vocab_file
        # set before the base __init__, which already asks for the vocabulary and the special-token layout
        self.add_bos_token, self.add_eos_token = bool(add_bos_token), bool(add_eos_token)
        self.sp_model = self._load_sp_model(vocab_file=vocab_file)
        super().__init__(
            bos_token=_as_added_token(bos_token),
            eos_token=_as_added_token(eos_token),
            unk_token=_as_added_token(unk_token),
            pad_token=_as_added_token(pad_token),
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            sp_model_kwargs=self.sp_model_kwargs,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )
        self.add_bos_token, self.add_eos_token = bool(add_bos_token), bool(add_eos_token)

    def _load_sp_model(self, *, vocab_file: str | None = None, proto: bytes | None = None) -> spm.SentencePieceProcessor:
        sp = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        try:
            if proto is not None:
                sp.LoadFromSerializedProto(proto)
            else:
                sp.Load(str(vocab_file))
        except (OSError, RuntimeError) as e:
            raise InputError(f"{vocab_file}: not a readable sentencepiece model ({str(e).splitlines()[0]})") from None
        return sp

    # pickling / deepcopy: the processor itself is not picklable, its serialized proto is
    def __getstate__(self):
        state = self.__dict__.copy()
        state["sp_model"] = None
        state["sp_model_proto"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state):
        proto = state.pop("sp_model_proto")
        self.__dict__.update(state)
        self.sp_model = self._load_sp_model(proto=proto)

    # ---- vocabulary ----------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(getattr(self, "_added_tokens_encoder", {}))
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Baichuan's rule: sentencepiece decodes the runs between special tokens; a special token is kept as its text,
        and one that follows ordinary tokens adds a space, written (as in the reference) before that run's text:
        tokens of "Hi" then "</s>" give " Hi</s>". Text without special tokens decodes exactly."""
        special = set(self.all_special_tokens)
        out, run, prev_is_special = "", [], False
        for i, token in enumerate(tokens):
            if token in special:
                if not prev_is_special and i != 0:
                    out += " "
                out += self.sp_model.decode(run) + token
                prev_is_special, run = True, []
            else:
                run.append(token)
                prev_is_special = False
        return out + self.sp_model.decode(run)

    # ---- special tokens --------------------------------------------------------------------------------------------
    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        output = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            output = output + bos + token_ids_1 + eos
        return output

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask = mask + bos + [0] * len(token_ids_1) + eos
        return mask

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """0 for the first sequence with its special tokens, 1 for the second."""
        n_special = int(self.add_bos_token) + int(self.add_eos_token)
        first = [0] * (n_special + len(token_ids_0))
        return first if token_ids_1 is None else first + [1] * (n_special + len(token_ids_1))

    # ---- saving ------------------------------------------------------------------------------------------------------
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise InputError(f"{save_directory}: not a directory")
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        out = os.path.join(save_directory, name)
        if os.path.abspath(str(self.vocab_file)) == os.path.abspath(out) and os.path.isfile(out):
            return (out,)
        if os.path.isfile(str(self.vocab_file)):
            atomic_write(out, lambda tmp: shutil.copyfile(self.vocab_file, tmp))
        else:
            atomic_write(out, lambda tmp: tmp.write_bytes(self.sp_model.serialized_model_proto()))
        return (out,)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers 5 leaves add_bos_token / add_eos_token out of the saved config (its fast tokenizers keep them in
        the post-processor); this class reads them from the config, so they are written back."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        prefix = kwargs.get("filename_prefix")
        config_file = os.path.join(str(save_directory), (prefix + "-" if prefix else "") + "tokenizer_config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
            config.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
            atomic_write_text(config_file, json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return files


def names_baichuan_tokenizer(tokenizer_config: dict) -> bool:
    """Whether a tokenizer_config.json names Baichuan's remote tokenizer class, in `tokenizer_class` or `auto_map`."""
    if tokenizer_config.get("tokenizer_class") == REMOTE_CLASS:
        return True
    auto = tokenizer_config.get("auto_map")
    entries = auto.get("AutoTokenizer") if isinstance(auto, dict) else auto
    if isinstance(entries, str):
        entries = [entries]
    return any(isinstance(e, str) and e.rsplit(".", 1)[-1] == REMOTE_CLASS for e in entries or [])


def _read_json(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_baichuan_tokenizer_folder(folder: str | os.PathLike) -> bool:
    """Whether a folder's tokenizer is Baichuan's: it has tokenizer.model, and its tokenizer_config.json names
    `BaichuanTokenizer`, or its config.json says model_type "baichuan" and tokenizer_config.json names no other class."""
    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, VOCAB_FILES_NAMES["vocab_file"])):
        return False
    tokenizer_config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    if names_baichuan_tokenizer(tokenizer_config):
        return True
    model_type = _read_json(os.path.join(folder, "config.json")).get("model_type")
    return model_type == "baichuan" and not tokenizer_config.get("tokenizer_class")


def load_baichuan_tokenizer(folder: str | os.PathLike) -> BaichuanTokenizer:
    """Baichuan's tokenizer from a checkpoint folder (tokenizer.model + optional tokenizer_config.json), no remote code."""
    return BaichuanTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
