"""Family cases for the mixture-of-experts families (model/moe.py): shared experts, sparse steps, dense layers among
sparse ones, top-k renormalisation on and off. transformers runs its reference ("eager") expert loop, which also runs
in float64 (its default grouped_mm does not)."""

from __future__ import annotations

import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from family_zoo import VOCAB, build

SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rope_theta=1000.0)


def eager(factory):
    def make():
        model = factory()
        model.set_experts_implementation("eager")
        return model
    return make


CASES = {
    # shared expert, every layer sparse but a dense one in the middle, weights not renormalised (Qwen2-57B-A14B's choice)
    "qwen2_moe": eager(build(Qwen2MoeConfig, Qwen2MoeForCausalLM, **SMALL, num_hidden_layers=4, intermediate_size=96,
                             moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=6,
                             num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False)),
    # every second layer sparse, top-3 of 5 renormalised
    "qwen2_moe-step2-norm": eager(build(Qwen2MoeConfig, Qwen2MoeForCausalLM, seed=3, **SMALL, num_hidden_layers=4,
                                        intermediate_size=80, moe_intermediate_size=24,
                                        shared_expert_intermediate_size=40, num_experts=5, num_experts_per_tok=3,
                                        decoder_sparse_step=2, norm_topk_prob=True)),
}

from transformers import (MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM,  # noqa: E402
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

CASES.update({
    # per-head q/k norms with an explicit head_dim, a dense layer, renormalised top-2 of 4
    "qwen3_moe": eager(build(Qwen3MoeConfig, Qwen3MoeForCausalLM, seed=4, **SMALL, head_dim=8, num_hidden_layers=3,
                             intermediate_size=80, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                             mlp_only_layers=[0], norm_topk_prob=True)),
    # top-2 of 4, float32 routing weights, a sliding window shorter than the test sequences
    "mixtral": eager(build(MixtralConfig, MixtralForCausalLM, seed=5, **SMALL, num_hidden_layers=3,
                           intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=12)),
    # q/k norms over the whole projection, top-3 of 6 not renormalised
    "olmoe": eager(build(OlmoeConfig, OlmoeForCausalLM, seed=6, **SMALL, num_hidden_layers=3, intermediate_size=40,
                         num_experts=6, num_experts_per_tok=3, eos_token_id=None, pad_token_id=None)),
})

from transformers import GptOssConfig, GptOssForCausalLM  # noqa: E402


def with_sinks(factory, seed: int):
    """gpt-oss's learned attention sinks spread over [-2, 2] (transformers initialises them near 0, where they hardly
    matter), so the sink column carries real mass in the parity tests."""
    def make():
        model = factory()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(torch.rand(layer.self_attn.sinks.shape, generator=gen) * 4 - 2)
        return model
    return make


GPT_OSS = dict(vocab_size=VOCAB, hidden_size=64, max_position_embeddings=64, eos_token_id=None, pad_token_id=None)

CASES.update({
    # sliding (window 7 < the tests' 20 tokens) / full / sliding, GQA with head_dim 24 != 64 / 4, top-2 of 6, YaRN
    # without truncation, and a SwiGLU limit low enough that the clamps bite on these random weights
    "gpt_oss": eager(with_sinks(build(
        GptOssConfig, GptOssForCausalLM, seed=7, **GPT_OSS, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, intermediate_size=32, num_local_experts=6, num_experts_per_tok=2,
        sliding_window=7, layer_types=["sliding_attention", "full_attention", "sliding_attention"], swiglu_limit=0.3,
        rope_parameters=dict(rope_type="yarn", factor=4.0, beta_fast=8.0, beta_slow=1.0, truncate=False,
                             original_max_position_embeddings=16, rope_theta=1000.0)), seed=7)),
    # full then sliding, no attention biases, multi-head (kv = heads), top-4 of 8, truncated YaRN, the default limit
    "gpt_oss-top4": eager(with_sinks(build(
        GptOssConfig, GptOssForCausalLM, seed=8, **GPT_OSS, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, intermediate_size=24, num_local_experts=8, num_experts_per_tok=4,
        sliding_window=5, layer_types=["full_attention", "sliding_attention"], attention_bias=False,
        rope_parameters=dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=32, rope_theta=500.0)),
        seed=8)),
})
