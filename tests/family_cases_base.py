"""Family cases for the families residscope had before the families-as-data wave, and GPT-2 (the first new one)."""

from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from family_zoo import VOCAB, build

CASES = {
    "llama": build(LlamaConfig, LlamaForCausalLM, vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   rope_theta=1000.0, attention_bias=True),
    "gpt2": build(GPT2Config, GPT2LMHeadModel, vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64),
}
