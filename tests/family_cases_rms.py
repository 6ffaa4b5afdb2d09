"""Family cases for the RMSNorm families added by the families-as-data wave: Qwen3, Gemma 1, Gemma 2, Phi-3, OLMo 2,
OLMo 3, Granite, SmolLM3. Each option a family has gets a case that exercises it on the 20-token test sequence
(windows shorter than it, a LongRoPE switch inside it, NoPE and sliding layers side by side, multipliers != 1)."""

from __future__ import annotations

from transformers import (Gemma2Config, Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM, GraniteConfig,
                          GraniteForCausalLM, Olmo2Config, Olmo2ForCausalLM, Olmo3Config, Olmo3ForCausalLM, Phi3Config,
                          Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM, SmolLM3Config, SmolLM3ForCausalLM)

from family_zoo import VOCAB, build

SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)


def longrope(half_rotary: int, original: int) -> dict:
    """LongRoPE factors for `half_rotary` frequency pairs; the long ones differ so the switch shows in the logits."""
    return {"rope_type": "longrope", "rope_theta": 1000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(half_rotary)],
            "long_factor": [2.0 + 0.7 * i for i in range(half_rotary)],
            "original_max_position_embeddings": original}


CASES = {
    # head_dim 24 is not hidden_size / heads; biases on q, k, v and o
    "qwen3": build(Qwen3Config, Qwen3ForCausalLM, **SMALL, head_dim=24, num_hidden_layers=3, attention_bias=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
    # layers from max_window_layers on slide, with a window shorter than the sequence
    "qwen3-sliding": build(Qwen3Config, Qwen3ForCausalLM, **SMALL, head_dim=16, num_hidden_layers=3,
                           use_sliding_window=True, sliding_window=6, max_window_layers=1, tie_word_embeddings=True),
    # sqrt(48) is not a float32 number: the embedding normaliser's rounding shows; hidden_act "gelu" means tanh GELU
    "gemma": build(GemmaConfig, GemmaForCausalLM, vocab_size=VOCAB, hidden_size=48, intermediate_size=96,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=20, num_hidden_layers=3,
                   max_position_embeddings=64, hidden_act="gelu"),
    # soft-caps small enough to bend the scores and logits; sliding (even) layers with a window shorter than the sequence
    "gemma2": build(Gemma2Config, Gemma2ForCausalLM, vocab_size=VOCAB, hidden_size=48, intermediate_size=96,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=3,
                    max_position_embeddings=64, query_pre_attn_scalar=24, sliding_window=6,
                    attn_logit_softcapping=3.0, final_logit_softcapping=2.0),
    "gemma2-nocap": build(Gemma2Config, Gemma2ForCausalLM, vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=16, num_hidden_layers=3,
                          max_position_embeddings=64, sliding_window=5, attn_logit_softcapping=None,
                          final_logit_softcapping=None, layer_types=["full_attention", "sliding_attention", "full_attention"]),
    "phi3": build(Phi3Config, Phi3ForCausalLM, **SMALL, num_hidden_layers=3, rope_parameters={"rope_theta": 1000.0},
                  pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # LongRoPE switches to the long factors past 16 tokens: the 20-token sequence runs on them, generation on the short
    "phi3-longrope": build(Phi3Config, Phi3ForCausalLM, **SMALL, num_hidden_layers=3, original_max_position_embeddings=16,
                           rope_parameters=longrope(8, 16), pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # Phi-4-mini's shape: partial rotary (half of each head) with LongRoPE, and a sliding window on every layer
    "phi3-partial-window": build(Phi3Config, Phi3ForCausalLM, **SMALL, num_hidden_layers=3,
                                 original_max_position_embeddings=16,
                                 rope_parameters={**longrope(4, 16), "partial_rotary_factor": 0.5}, sliding_window=7,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "olmo2": build(Olmo2Config, Olmo2ForCausalLM, **SMALL, num_hidden_layers=3, attention_bias=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, pad_token_id=0, eos_token_id=2),
    # three sliding layers then one full, each type with its own RoPE (YaRN on the full layers)
    "olmo3": build(Olmo3Config, Olmo3ForCausalLM, **SMALL, num_hidden_layers=4, sliding_window=6,
                   rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0,
                                                       "original_max_position_embeddings": 16},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 300.0}},
                   pad_token_id=0, eos_token_id=2),
    "granite": build(GraniteConfig, GraniteForCausalLM, **SMALL, num_hidden_layers=3, embedding_multiplier=3.7,
                     attention_multiplier=0.6, residual_multiplier=0.7, logits_scaling=1.7, attention_bias=True,
                     mlp_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
    # NoPE layers 1 and 3 (SmolLM3Config's default pattern would be every 4th); they slide, the RoPE layers do not
    "smollm3": build(SmolLM3Config, SmolLM3ForCausalLM, **SMALL, num_hidden_layers=4, no_rope_layers=[1, 0, 1, 0],
                     use_sliding_window=True, sliding_window=6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
}
