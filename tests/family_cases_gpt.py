"""Family cases of the GPT lineage: GPT-2, GPT-NeoX (Pythia), GPT-J, GPT-Neo, OPT, BLOOM, one per option that changes
the computation (parallel or serial NeoX blocks, partial rotary, GPT-Neo local layers with a window shorter than the
tests' 20 tokens, OPT pre-LN and post-LN with projected embeddings, BLOOM with a head count that is no power of two)."""

from __future__ import annotations

from transformers import (BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM,
                          GPTNeoConfig, GPTNeoForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, OPTConfig,
                          OPTForCausalLM)

from family_zoo import VOCAB, build

CASES = {
    "gpt2": build(GPT2Config, GPT2LMHeadModel, vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64),
    "gpt_neox": build(GPTNeoXConfig, GPTNeoXForCausalLM, vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.25,
                      rotary_emb_base=1000, use_parallel_residual=True),
    "gpt_neox-serial": build(GPTNeoXConfig, GPTNeoXForCausalLM, vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5,
                             use_parallel_residual=False, hidden_act="gelu_new"),
    "gptj": build(GPTJConfig, GPTJForCausalLM, vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                  rotary_dim=8),
    "gpt_neo": build(GPTNeoConfig, GPTNeoForCausalLM, vocab_size=VOCAB, hidden_size=64, num_layers=3, num_heads=4,
                     max_position_embeddings=64, window_size=6,
                     attention_types=[[["global", "local"], 1], [["local"], 1]]),
    "opt": build(OPTConfig, OPTForCausalLM, vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=3,
                 num_attention_heads=4, max_position_embeddings=64, do_layer_norm_before=True),
    "opt-postln": build(OPTConfig, OPTForCausalLM, vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=64, do_layer_norm_before=False,
                        word_embed_proj_dim=32),
    "bloom": build(BloomConfig, BloomForCausalLM, vocab_size=VOCAB, hidden_size=96, n_layer=3, n_head=6),
}
