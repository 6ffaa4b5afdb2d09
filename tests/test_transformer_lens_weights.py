"""TransformerLens weights and decompositions on residscope models: exact, on tiny random models of every family.

Families (configs built the way the loader reads them): Llama with GQA, Llama with every bias (qkv, o, MLP), Qwen2
(qkv biases), Mistral with a window shorter than the sequence, Gemma 3 (post-norms, q/k norms, (1 + w) norms, embedding
scale, local/global layers) and Baichuan 2 13B (ALiBi, NormHead). Exactness is checked against the model's own logits,
in float32 (1e-4) and float64 (1e-9).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformer_lens import ActivationCache, FactoredMatrix
from transformer_lens.model_protocol import TransformerLensModelWithWeights
from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

from residscope.model import Decoder, DecoderConfig
from residscope.model.config import FULL, SLIDING

VOCAB, SEQ, BATCH = 96, 12, 2
SMALL = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, max_position_embeddings=64)

FAMILIES = {
    "llama_gqa": lambda: LlamaConfig(**SMALL, num_attention_heads=6, num_key_value_heads=2).to_dict(),
    "llama_biases": lambda: LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=4, attention_bias=True,
                                        mlp_bias=True).to_dict(),
    "qwen2_bias": lambda: Qwen2Config(**SMALL, num_attention_heads=4, num_key_value_heads=2).to_dict(),
    "mistral_window": lambda: MistralConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2,
                                            sliding_window=4).to_dict(),
    "gemma3": lambda: Gemma3TextConfig(
        **{**SMALL, "num_hidden_layers": 4}, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        query_pre_attn_scalar=24, sliding_window=4, layer_types=[SLIDING, FULL, SLIDING, FULL],
        rope_parameters={FULL: {"rope_type": "default", "rope_theta": 10_000.0},
                         SLIDING: {"rope_type": "default", "rope_theta": 100.0}}).to_dict(),
    "baichuan_alibi": lambda: {"model_type": "baichuan", "architectures": ["BaichuanForCausalLM"], "hidden_size": 48,
                               "intermediate_size": 80, "num_attention_heads": 6, "num_hidden_layers": 3,
                               "vocab_size": VOCAB, "rms_norm_eps": 1e-6, "hidden_act": "silu",
                               "model_max_length": 4096, "tie_word_embeddings": False},
}


def build(family: str, dtype=torch.float32, **changes) -> Decoder:
    """A random model whose weights make attention sharp and logits O(1..10); norm gains far from 1."""
    cfg = DecoderConfig.from_hf(FAMILIES[family]()).replace(**changes)
    model = Decoder(cfg)
    g = torch.Generator().manual_seed(len(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.split(".")[-2].startswith("ln"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.0 if cfg.norm_offset else 1.0))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p.shape[1] ** 0.5))
            else:  # biases
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.to(dtype).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def run(model: Decoder, tokens: torch.Tensor) -> tuple[torch.Tensor, ActivationCache]:
    logits, cache = model.run_with_cache(tokens)
    return logits, cache if isinstance(cache, ActivationCache) else ActivationCache(cache, model)


def tol(dtype) -> dict:
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-9)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


# ---- exact decompositions ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_direct_logit_attribution_sums_to_logit_difference(family, dtype):
    model = build(family, dtype)
    post_norms = model.cfg.post_norms
    model.set_use_attn_result(post_norms)  # Gemma 3's post-norm: exact per-head results need hook_result
    tokens = ids()
    logits, cache = run(model, tokens)
    right, wrong = logits[:, -1].argmax(-1), logits[:, -1].argmin(-1)  # [batch]
    # neurons cannot be split out of a post-normed MLP; whole MLP outputs can
    stack, labels = cache.get_full_resid_decomposition(expand_neurons=not post_norms, pos_slice=-1, return_labels=True)
    attrs = cache.logit_attrs(stack, tokens=right, incorrect_tokens=wrong, pos_slice=-1)  # [component, batch]
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    assert labels[0] == "L0H0" and labels[-2:] == ["embed", "bias"] and len(labels) == attrs.shape[0]
    assert attrs.shape[0] == n_heads + model.cfg.n_layers * (1 if post_norms else model.cfg.d_mlp) + 2
    true_diff = logits[:, -1].gather(-1, right[:, None])[:, 0] - logits[:, -1].gather(-1, wrong[:, None])[:, 0]
    assert_close(attrs.sum(0), true_diff, **tol(dtype))
    # the per-layer view (decompose_resid) is exact too, and so is the plain residual stream
    layers = cache.decompose_resid(pos_slice=-1)
    assert_close(cache.logit_attrs(layers, right, wrong, pos_slice=-1).sum(0), true_diff, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_accumulated_resid_unembedded_equals_logits(family, dtype):
    model = build(family, dtype)
    tokens = ids()
    _, cache = run(model, tokens)
    logits = model(tokens)  # ln_final recomputed on the stack runs unhooked, like this forward
    accum, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)  # [layer + 1, batch, pos, d_model]
    assert labels[-1] == "final_post" and accum.shape[0] == model.cfg.n_layers + 1
    assert_close(accum[-1] @ model.W_U + model.b_U, logits, **tol(dtype))  # NormHead: W_U is the normalised matrix
    assert_close(model.unembed(accum[-1]), logits, **tol(dtype))
    assert_close(run(model, tokens)[0], logits, **tol(dtype))  # a cached run divides by the hooked scales: same numbers


def test_head_results_sum_to_attention_output(family):
    model = build(family, torch.float64)
    tokens = ids()
    reference, _ = run(model, tokens)
    model.set_use_attn_result(True)
    logits, cache = run(model, tokens)
    assert_close(logits, reference, **tol(torch.float64))  # the per-head path computes the same model
    heads = cache.stack_head_results()  # [layer * head, batch, pos, d_model]
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = heads.view(n_layers, n_heads, *heads.shape[1:])
    for layer in range(n_layers):
        result = cache["result", layer]  # [batch, pos, head, d_model]
        assert result.shape == (BATCH, SEQ, n_heads, model.cfg.d_model)
        attn_out = cache["attn_out", layer]
        assert_close(result.sum(-2) + model.blocks[layer].attn.b_O, attn_out, **tol(torch.float64))
        assert_close(heads[layer].sum(0) + model.b_O[layer], attn_out, **tol(torch.float64))


def test_head_results_from_z_without_the_opt_in(family):
    """TransformerLens rebuilds hook_result as z @ W_O when it was not cached: exact, or refused under a post-norm."""
    model = build(family, torch.float64)
    _, cache = run(model, ids())
    assert not any(k.endswith("hook_result") for k in cache.keys())  # opt-in: off by default
    if model.cfg.post_norms:
        with pytest.raises(ValueError, match="ln1_post.*set_use_attn_result"):
            cache.stack_head_results()
        model.set_use_attn_result(True)
        _, cache = run(model, ids())
        with pytest.raises(ValueError, match="ln2_post.*expand_neurons=False"):
            cache.get_full_resid_decomposition(expand_neurons=True)
        return
    heads = cache.stack_head_results().view(model.cfg.n_layers, model.cfg.n_heads, BATCH, SEQ, -1)
    assert_close(heads.sum(1) + model.b_O[:, None, None], cache.stack_activation("attn_out"), **tol(torch.float64))
    neurons = cache.get_neuron_results(1)  # [batch, pos, d_mlp, d_model]
    assert_close(neurons.sum(-2) + model.blocks[1].mlp.b_out, cache["mlp_out", 1], **tol(torch.float64))


def test_accumulated_bias_is_the_sum_of_output_biases():
    model = build("llama_biases", torch.float64)
    b_o, b_out = model.b_O, model.b_out  # [layer, d_model]
    assert b_o.abs().sum() > 0 and b_out.abs().sum() > 0
    assert_close(model.accumulated_bias(2), b_o[:2].sum(0) + b_out[:2].sum(0))
    assert_close(model.accumulated_bias(2, mlp_input=True), b_o[:3].sum(0) + b_out[:2].sum(0))
    assert_close(model.accumulated_bias(3, include_mlp_biases=False), b_o.sum(0))
    assert_close(model.accumulated_bias(0), torch.zeros(model.cfg.d_model, dtype=torch.float64))
    with pytest.raises(ValueError, match="layer must be in"):
        model.accumulated_bias(3, mlp_input=True)


def test_final_softcap_refuses_logit_attribution():
    model = build("gemma3", final_softcap=4.0)
    logits, cache = run(model, ids())
    with pytest.raises(ValueError, match="soft-capping.*not linear"):
        cache.logit_attrs(cache.decompose_resid(pos_slice=-1), tokens=logits[:, -1].argmax(-1), pos_slice=-1)
    # the logit lens itself stays exact through model.unembed, which applies the cap
    assert_close(model.unembed(cache.accumulated_resid(apply_ln=True)[-1]), logits, atol=1e-4, rtol=1e-4)


# ---- weights as views -------------------------------------------------------------------------------------------------
def test_weight_shapes_follow_transformer_lens():
    model = build("llama_gqa")
    c = model.cfg
    L, H, KV, M, D, F, V = c.n_layers, c.n_heads, c.n_kv_heads, c.d_model, c.d_head, c.d_mlp, c.d_vocab
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    expected = {
        "W_E": (model.W_E, (V, M)), "W_U": (model.W_U, (M, V)), "b_U": (model.b_U, (V,)),
        "W_Q": (model.W_Q, (L, H, M, D)), "W_K": (model.W_K, (L, H, M, D)), "W_V": (model.W_V, (L, H, M, D)),
        "W_O": (model.W_O, (L, H, D, M)), "b_Q": (model.b_Q, (L, H, D)), "b_K": (model.b_K, (L, H, D)),
        "b_V": (model.b_V, (L, H, D)), "b_O": (model.b_O, (L, M)), "W_in": (model.W_in, (L, M, F)),
        "W_gate": (model.W_gate, (L, M, F)), "W_out": (model.W_out, (L, F, M)), "b_in": (model.b_in, (L, F)),
        "b_out": (model.b_out, (L, M)), "attn._W_K": (attn._W_K, (KV, M, D)), "attn._W_V": (attn._W_V, (KV, M, D)),
        "attn._b_K": (attn._b_K, (KV, D)), "attn.W_O": (attn.W_O, (H, D, M)), "mlp.W_out": (mlp.W_out, (F, M)),
    }
    assert model.embed.W_E is model.embed.weight and model.unembed.W_U.shape == (M, V)  # TransformerLens' module names
    for name, (tensor, shape) in expected.items():
        assert tuple(tensor.shape) == shape, name
    # TransformerLens' GQA convention: query head h reads KV head h // (H / KV)
    assert_close(attn.W_K, attn._W_K.repeat_interleave(H // KV, dim=0), atol=0, rtol=0)
    assert_close(attn.W_K[H // KV + 1], attn._W_K[1], atol=0, rtol=0)
    assert isinstance(model.QK, FactoredMatrix) and model.QK.shape == (L, H, M, M)
    assert isinstance(attn.OV, FactoredMatrix) and attn.OV.shape == (H, M, M)


def test_qk_circuit_gives_the_attention_scores_of_query_and_key_heads():
    """x_q QK[h] x_k^T equals q_h . k_{h // n_rep} computed by the model (before RoPE), so the GQA mapping is right."""
    model = build("llama_gqa", torch.float64)
    _, cache = run(model, ids())
    normed = cache["blocks.1.ln1.hook_normalized"][0]  # [pos, d_model]
    q, k = cache["q", 1][0], cache["k", 1][0]  # [pos, head, d_head], [pos, kv_head, d_head]
    for h in range(model.cfg.n_heads):
        scores = normed @ model.blocks[1].attn.QK[h].AB @ normed.T  # [pos, pos]
        assert_close(scores, q[:, h] @ k[:, h // model.cfg.n_rep].T, atol=1e-9, rtol=1e-9)
    ov = model.OV[1, 2].AB  # [d_model, d_model]: a head's write per unit of attention
    assert_close(normed @ ov, cache["v", 1][0][:, 2 // model.cfg.n_rep] @ model.W_O[1, 2], atol=1e-9, rtol=1e-9)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("family_name", ["llama_gqa", "llama_biases"])
def test_block_weights_are_views_of_the_parameters(family_name):
    model = build(family_name)
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    pairs = [(attn.W_Q, attn.q_proj.weight), (attn._W_K, attn.k_proj.weight), (attn._W_V, attn.v_proj.weight),
             (attn.W_O, attn.o_proj.weight), (mlp.W_in, mlp.up_proj.weight), (mlp.W_gate, mlp.gate_proj.weight),
             (mlp.W_out, mlp.down_proj.weight), (model.W_E, model.embed.weight), (model.W_U, model.unembed.weight)]
    if model.cfg.qkv_bias:
        pairs += [(attn.b_Q, attn.q_proj.bias), (attn._b_K, attn.k_proj.bias), (attn.b_O, attn.o_proj.bias),
                  (mlp.b_in, mlp.up_proj.bias), (mlp.b_out, mlp.down_proj.bias)]
    for view, param in pairs:
        assert _storage(view) == _storage(param)
    assert_close(attn.W_Q[2], attn.q_proj.weight[2 * model.cfg.d_head: 3 * model.cfg.d_head].T, atol=0, rtol=0)
    assert_close(attn.W_O[2], attn.o_proj.weight[:, 2 * model.cfg.d_head: 3 * model.cfg.d_head].T, atol=0, rtol=0)


def test_zeroing_a_view_ablates_what_it_should():
    """Writes through the views change the model exactly as the matching activation edit does."""
    model = build("llama_biases", torch.float64)
    tokens = ids()
    before = model(tokens)

    def zero_head(z, hook):
        z[:, :, 2] = 0
        return z

    ablated_z = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", zero_head)])
    with torch.no_grad():
        model.blocks[1].attn.W_O[2] = 0
    assert_close(model(tokens), ablated_z, atol=1e-9, rtol=1e-9)
    assert not torch.allclose(model(tokens), before)

    def zero_neuron(post, hook):
        post[..., 7] = 0
        return post

    ablated_n = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp.hook_post", zero_neuron)])
    with torch.no_grad():
        model.W_out  # a stacked copy: writing into it must not be mistaken for an edit
        model.blocks[0].mlp.W_out[7] = 0
    assert_close(model(tokens), ablated_n, atol=1e-9, rtol=1e-9)

    with torch.no_grad():
        model.blocks[2].attn.W_Q[1] = 0
        model.blocks[2].attn.b_Q[1] = 0
    _, cache = run(model, tokens)
    assert cache["q", 2][:, :, 1].abs().max() == 0 and cache["q", 2][:, :, 0].abs().max() > 0

    with torch.no_grad():
        model.W_U[:, 5] = 0
        model.W_E[3] = 0
    assert (model(tokens)[..., 5] == 0).all()
    assert (model.embed(torch.tensor([3])) == 0).all()


def test_removed_sublayers_stack_zeros():
    """A layer whose attention (or MLP) was cut adds nothing to the residual stream: its stacked weights are zeros and
    index i stays block i; its bias is not accumulated."""
    model = build("llama_biases", torch.float64)
    b_o, b_out = model.b_O.clone(), model.b_out.clone()
    model.remove_sublayers(attn=[1], mlp=[2])
    assert model.W_Q.shape[0] == 3 and (model.W_Q[1] == 0).all() and (model.W_O[1] == 0).all()
    assert (model.W_out[2] == 0).all() and (model.W_out[1] != 0).any()
    assert_close(model.accumulated_bias(3), b_o[0] + b_o[2] + b_out[0] + b_out[1])
    logits, cache = run(model, ids())
    accum = cache.accumulated_resid(apply_ln=True)
    assert_close(accum[-1] @ model.W_U, logits, atol=1e-9, rtol=1e-9)


# ---- hooks -------------------------------------------------------------------------------------------------------------
def test_ln_scale_hooks_are_the_rms_and_are_used(family):
    model = build(family)
    tokens = ids()
    _, cache = run(model, tokens)
    resid = cache["resid_pre", 1]
    scale = cache["blocks.1.ln1.hook_scale"]
    assert scale.shape == (BATCH, SEQ, 1)
    assert_close(scale, (resid.pow(2).mean(-1, keepdim=True) + model.cfg.norm_eps).sqrt())
    assert cache["ln_final.hook_scale"].shape == (BATCH, SEQ, 1)
    if model.cfg.post_norms:
        assert cache["blocks.0.ln1_post.hook_scale"].shape == (BATCH, SEQ, 1)
    # patching the scale changes what the norm outputs: the forward divides by the hooked value
    doubled = model.run_with_hooks(tokens, fwd_hooks=[("ln_final.hook_scale", lambda s, hook: s * 2)])
    expected = model.unembed(model.ln_final(cache["resid_post", model.cfg.n_layers - 1]) / 2)
    assert_close(doubled, expected, atol=1e-4, rtol=1e-4)


def test_mlp_in_is_resid_mid_and_editing_it_spares_the_residual():
    model = build("llama_gqa")
    tokens = ids()
    _, cache = run(model, tokens)
    assert_close(cache["blocks.1.hook_mlp_in"], cache["resid_mid", 1], atol=0, rtol=0)

    def zero_in_place(x, hook):
        x.zero_()

    seen = {}
    with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_in", zero_in_place),
                                ("blocks.1.hook_mlp_out", lambda x, hook: seen.setdefault("mlp_out", x)),
                                ("blocks.1.hook_resid_post", lambda x, hook: seen.setdefault("post", x))]):
        model(tokens)
    # the MLP saw zeros (its output is the MLP of zeros), and resid_mid kept its value: resid_post = resid_mid + mlp_out
    assert_close(seen["mlp_out"], model.blocks[1].mlp(model.blocks[1].ln2(torch.zeros_like(seen["post"]))))
    assert_close(seen["post"], cache["resid_mid", 1] + seen["mlp_out"])


def test_ln_scale_receives_gradients():
    """Attribution patching reads gradients at hook_scale: a backward hook there puts the scale in the graph."""
    model = build("llama_gqa", torch.float64)
    tokens = ids()
    reference = model(tokens)
    grads = {}
    with model.hooks(bwd_hooks=[("blocks.1.ln1.hook_scale", lambda g, hook: grads.setdefault("scale", g))]):
        logits = model(tokens)
        logits[:, -1, 0].sum().backward()
    assert grads["scale"].shape == (BATCH, SEQ, 1) and grads["scale"].abs().max() > 0
    assert_close(logits.detach(), reference, atol=1e-9, rtol=1e-9)


def test_split_qkv_input_hooks(family):
    model = build(family, torch.float64)
    c = model.cfg
    tokens = ids()
    reference, ref_cache = run(model, tokens)
    model.set_use_split_qkv_input(True)
    logits, cache = run(model, tokens)
    assert_close(logits, reference, atol=1e-9, rtol=1e-9)
    assert cache["blocks.1.hook_q_input"].shape == (BATCH, SEQ, c.n_heads, c.d_model)
    assert cache["blocks.1.hook_k_input"].shape == (BATCH, SEQ, c.n_kv_heads, c.d_model)
    assert cache["blocks.1.hook_v_input"].shape == (BATCH, SEQ, c.n_kv_heads, c.d_model)
    assert_close(cache["blocks.1.hook_q_input"][:, :, 2], cache["resid_pre", 1], atol=0, rtol=0)

    # patching one head's query input changes that head's queries only: not the other heads, keys or values
    other = ref_cache["resid_pre", 2]

    def patch_q(x, hook):
        x[:, :, 1] = other
        return x

    with model.hooks(fwd_hooks=[("blocks.1.hook_q_input", patch_q)]):
        _, patched = run(model, tokens)
    changed = (patched["q", 1] - ref_cache["q", 1]).abs().amax(dim=(0, 1, 3))  # [head]
    assert changed[1] > 1e-3 and changed[torch.arange(c.n_heads) != 1].max() < 1e-9
    for name in ("k", "v"):
        assert_close(patched[name, 1], ref_cache[name, 1], atol=1e-9, rtol=1e-9)

    def patch_k(x, hook):
        x[:, :, 0] = other
        return x

    with model.hooks(fwd_hooks=[("blocks.1.hook_k_input", patch_k)]):
        _, patched = run(model, tokens)
    assert_close(patched["q", 1], ref_cache["q", 1], atol=1e-9, rtol=1e-9)
    assert_close(patched["v", 1], ref_cache["v", 1], atol=1e-9, rtol=1e-9)
    assert (patched["k", 1][:, :, 0] - ref_cache["k", 1][:, :, 0]).abs().max() > 1e-3


def test_attn_in_hook_and_its_gqa_refusal():
    model = build("llama_biases", torch.float64)
    tokens = ids()
    reference = model(tokens)
    model.set_use_attn_in(True)
    logits, cache = run(model, tokens)
    assert_close(logits, reference, atol=1e-9, rtol=1e-9)
    assert cache["blocks.0.hook_attn_in"].shape == (BATCH, SEQ, model.cfg.n_heads, model.cfg.d_model)
    gqa = build("llama_gqa")
    with pytest.raises(ValueError, match="cannot feed 2 KV heads"):
        gqa.set_use_attn_in(True)
    gqa.cfg.use_attn_in = True  # set on cfg directly, as TransformerLens users do: refused at the forward
    with pytest.raises(ValueError, match="cannot feed 2 KV heads"):
        gqa(tokens)


def test_hook_tokens_when_asked():
    model = build("llama_gqa")
    tokens = ids()
    _, cache = run(model, tokens)
    assert "hook_tokens" not in cache.keys()
    model.set_use_hook_tokens(True)
    _, cache = run(model, tokens)
    assert torch.equal(cache["hook_tokens"], tokens)


def test_switches_set_on_cfg_take_effect():
    model = build("llama_gqa")
    model.cfg.use_attn_result = True
    _, cache = run(model, ids())
    assert "blocks.0.attn.hook_result" in cache.keys()
    model.cfg.use_attn_result = False
    _, cache = run(model, ids())
    assert "blocks.0.attn.hook_result" not in cache.keys()


def test_transformer_lens_protocol():
    model = build("llama_gqa")
    assert isinstance(model, TransformerLensModelWithWeights)


# ---- the bundled model -------------------------------------------------------------------------------------------------
@pytest.mark.real
def test_real_model_direct_logit_attribution(real_model):
    model = real_model
    tokens = model.to_tokens("The Eiffel Tower is in the city of")
    logits, cache = run(model, tokens)
    right, wrong = logits[0, -1].topk(2).indices
    stack = cache.get_full_resid_decomposition(expand_neurons=False, pos_slice=-1)
    attrs = cache.logit_attrs(stack, tokens=right[None], incorrect_tokens=wrong[None], pos_slice=-1)
    assert_close(attrs.sum(0), (logits[0, -1, right] - logits[0, -1, wrong])[None], atol=1e-3, rtol=1e-4)
    accum = cache.accumulated_resid(apply_ln=True, pos_slice=-1)  # [layer + 1, batch, d_model]
    assert_close(accum[-1] @ model.W_U, logits[:, -1], atol=1e-3, rtol=1e-4)
