"""A tiny random Llama checkpoint with a real (small, trained-here) BPE tokenizer, for tests of the explorer and the
notebooks: every page and cell runs on it in well under a second per forward."""

from __future__ import annotations

from pathlib import Path

MAX_POSITIONS = 128  # the "trained window" of the tiny model, so context extension has something to extend


def make_tiny_checkpoint(folder: Path, *, n_layers: int = 4, vocab_size: int = 512, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and tokenizer files of a random LlamaForCausalLM to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(vocab_size)
    eos = tokenizer.eos_token_id

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                         rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos)
    model = LlamaForCausalLM(config).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained here on the built-in corpus, BOS = EOS = <|endoftext|> (SmolLM2's shape)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from residscope.analyses.corpus import builtin_text

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([builtin_text("calibration")[:60_000]], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
