"""Text <-> token ids the way TransformerLens does it: BOS handling per tokenizer, padding and the mask that goes with it.

Pure helpers over a transformers tokenizer; `Decoder.to_tokens` & co. are thin wrappers around them.

BOS: `prepend_bos=True` means "the ids start with BOS". A tokenizer that adds BOS itself (Llama 2, Gemma) is left alone;
one that does not (SmolLM2's GPT-2 style BPE) gets the BOS id put in front. `prepend_bos=False` removes the BOS a
tokenizer added. So BOS is never doubled and never missing, whichever tokenizer the model has.

Padding: rows of unequal length are padded with the pad token (the EOS token where the tokenizer has no pad token, as
TransformerLens does), on the right unless asked otherwise, and `encode` returns the mask with the ids. Ids that arrive
without a mask are handled by `left_padding_mask`, TransformerLens's `get_attention_mask` for left padding.

Which ids may be read as padded (`leading_pad_is_padding`): a leading pad id means padding only when it cannot be a real
token (a pad token of its own), when the caller says the ids are left padded, or when `to_tokens` padded this very
tensor (`remember_padded`). Where the pad id is the EOS fallback or BOS (SmolLM2: BOS, EOS and pad one id), a row
starting with it is as likely a BOS followed by a document separator; nothing in the ids tells them apart, so they are
taken as they are, as transformers does for a pad id equal to EOS.
"""

from __future__ import annotations

import weakref

import torch

from .errors import InputError

PADDING_SIDES = ("left", "right")


def prepends_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front on its own (TransformerLens's detect_tokenizer_bos_eos)."""
    ids = tokenizer.encode("a")
    return len(ids) > 1 and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def appends_eos(tokenizer) -> bool:
    ids = tokenizer.encode("a")
    return len(ids) > 1 and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id


def pad_token_id(tokenizer) -> int | None:
    """The id used for padding: the tokenizer's pad token, else its EOS (TransformerLens's setup_tokenizer)."""
    if tokenizer is None:
        return None
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_is_own_token(tokenizer) -> bool:
    """Whether the pad id can only be padding: the tokenizer has a pad token that is neither its BOS nor its EOS."""
    pad = tokenizer.pad_token_id if tokenizer is not None else None
    return pad is not None and pad not in (tokenizer.bos_token_id, tokenizer.eos_token_id)


# ids tensors that `to_tokens` padded, by id(); weak, so a tensor's entry goes with the tensor (and a reused id() is
# told apart by `is`)
_PADDED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def remember_padded(ids: torch.Tensor) -> torch.Tensor:
    """Mark ids [batch, pos] as a batch the tokenizer padded (returned unchanged)."""
    _PADDED[id(ids)] = ids
    return ids


def leading_pad_is_padding(ids: torch.Tensor, tokenizer, told_left: bool) -> bool:
    """Whether rows of ids [batch, pos] that start with the pad id may be read as left padded (see the module doc)."""
    return told_left or pad_is_own_token(tokenizer) or _PADDED.get(id(ids)) is ids


def bos_token_id(tokenizer) -> int | None:
    """BOS id, or EOS for tokenizers without one (GPT-2 style: TransformerLens's fallback)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_rows(tokenizer, texts: list[str], *, prepend_bos: bool, tokenizer_bos: bool, tokenizer_eos: bool,
                max_len: int | None) -> list[list[int]]:
    """Token ids per text (unpadded), starting with BOS iff `prepend_bos`, cut to `max_len` when given."""
    bos = bos_token_id(tokenizer)
    if prepend_bos and bos is None:
        raise InputError("prepend_bos=True but the tokenizer has neither a BOS nor an EOS token")
    rows = []
    for ids in tokenizer(texts)["input_ids"]:
        if tokenizer_eos and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id:
            ids = ids[:-1]  # TransformerLens strips an EOS the tokenizer appends by itself
        if tokenizer_bos and not prepend_bos:
            ids = ids[1:]
        elif prepend_bos and not tokenizer_bos:
            ids = [bos] + ids
        rows.append(ids[:max_len] if max_len is not None else ids)
    return rows


def pad_rows(rows: list[list[int]], pad_id: int | None, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> (ids [batch, pos], mask [batch, pos] with 1 for tokens, 0 for padding)."""
    if side not in PADDING_SIDES:
        raise InputError(f"padding_side must be 'left' or 'right', got {side!r}")
    width = max(len(r) for r in rows)
    if pad_id is None and any(len(r) != width for r in rows):
        raise InputError("texts tokenise to different lengths and the tokenizer has no pad or EOS token to pad with")
    ids = torch.full((len(rows), width), pad_id if pad_id is not None else 0, dtype=torch.long)  # [batch, pos]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [batch, pos]
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def left_padding_mask(ids: torch.Tensor, pad_id: int, *, bos_is_pad: bool, prepend_bos: bool) -> torch.Tensor:
    """TransformerLens's get_attention_mask for left padding: leading pad tokens get 0; when BOS and pad share an id
    and BOS is prepended, the last leading pad is that BOS and stays visible. ids [batch, pos] -> mask [batch, pos]."""
    is_leading_pad = (ids != pad_id).long().cumsum(-1) == 0  # [batch, pos]
    mask = (~is_leading_pad).long()  # [batch, pos]
    if prepend_bos and bos_is_pad:
        # the BOS is the last of the leading "pads" (TransformerLens indexes -1 for a row with none: the last column,
        # which is a real token there anyway)
        last_pad = is_leading_pad.sum(-1) - 1  # [batch]
        mask[torch.arange(ids.shape[0], device=ids.device), last_pad] = 1
    return mask


def check_ids(ids: torch.Tensor, d_vocab: int, pad_id: int | None) -> int:
    """Refuse ids that cannot index the embedding (one line naming `input`) and return how many rows start with the pad
    token (0 when there is no pad token): one reduction, one device sync."""
    if ids.is_meta:
        raise InputError("input is on the meta device (a tensor without data); load or move the ids to a real device")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InputError(f"input must be integer token ids, got dtype {ids.dtype} "
                         "(a residual stream [batch, pos, d_model] goes in with start_at_layer=)")
    if ids.dim() != 2:
        raise InputError(f"input must be token ids [batch, pos] or [pos], got shape {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise InputError(f"input is empty (shape {tuple(ids.shape)}): pass at least one token per row")
    first = ids[:, 0] == pad_id if pad_id is not None else torch.zeros_like(ids[:, 0], dtype=torch.bool)  # [batch]
    lo, hi, pad_rows_ = torch.stack((ids.min(), ids.max(), first.sum())).tolist()
    if lo < 0 or hi >= d_vocab:
        bad = lo if lo < 0 else hi
        raise InputError(f"input holds token id {bad}, outside the vocabulary [0, {d_vocab - 1}]")
    return pad_rows_


# ---- argument checks of Decoder's entry points (one line each, naming the argument) ----------------------------------
def check_predictable(tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """A next-token loss needs a token to predict: at least 2 positions, and with a mask at least one pair of real
    tokens (else the mean is 0/0 = NaN)."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise InputError(f"loss: nothing to predict in tokens of shape {tuple(tokens.shape)} (a next-token loss needs "
                         "at least 2 positions)")
    if attention_mask is not None and attention_mask.shape == tokens.shape:
        real = attention_mask.bool()
        if not bool((real[:, :-1] & real[:, 1:]).any()):
            raise InputError("loss: nothing to predict (attention_mask leaves no two consecutive real tokens)")


def check_layer_arg(name: str, value, n_layers: int) -> None:
    """start_at_layer / stop_at_layer: an int in -n_layers..n_layers (negative counts from the end, as slices do)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not -n_layers <= value <= n_layers:
        raise InputError(f"{name}={value!r} out of range for {n_layers} layers (an integer in {-n_layers}..{n_layers})")


def check_position_ids(position_ids, batch: int, pos: int) -> torch.Tensor:
    """position_ids [batch, pos], [1, pos] or [pos] of integers -> [batch, pos]."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point() or position_ids.is_complex() \
            or position_ids.dtype == torch.bool:
        what = position_ids.dtype if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise InputError(f"position_ids must be an integer tensor [batch, pos], got {what}")
    shape = tuple(position_ids.shape)
    if shape not in ((batch, pos), (1, pos), (pos,)):
        also = f" (or {(1, pos)})" if batch != 1 else ""
        raise InputError(f"position_ids has shape {shape}, expected {(batch, pos)}{also} for input [batch={batch}, "
                         f"pos={pos}]")
    return position_ids.reshape(-1, pos).expand(batch, pos)


def check_decodable(tokens, tokenizer, d_vocab: int = 0) -> torch.Tensor:
    """Ids as a tensor, refused when one is neither a token of the tokenizer nor a row of the model's `d_vocab`
    embedding (`decode` would drop it silently). Rows past the tokenizer's end that the model has (a vocabulary padded
    for speed) can come out of generation and decode to "" as in transformers."""
    try:
        ids = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"token ids must be an int, a list or a tensor, got {type(tokens).__name__}") from None
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InputError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.numel():
        lo, hi, n = int(ids.min()), int(ids.max()), max(len(tokenizer), d_vocab)
        if lo < 0 or hi >= n:
            raise InputError(f"token id {lo if lo < 0 else hi} is outside the vocabulary "
                             f"[0, {n - 1}]")
    return ids
