"""Family cases for the families residscope had before the families-as-data wave (GPT-2's is in family_cases_gpt.py)."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from family_zoo import VOCAB, build

CASES = {
    "llama": build(LlamaConfig, LlamaForCausalLM, vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   rope_theta=1000.0, attention_bias=True),
}
