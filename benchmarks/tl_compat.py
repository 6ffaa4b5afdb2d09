"""How much TransformerLens code runs unchanged on residscope: ~100 calls in the style of TransformerLens's demos.

    python benchmarks/tl_compat.py                  # the bundled SmolLM2-135M; prints every call that failed and the share
    python benchmarks/tl_compat.py --model PATH     # another folder, GGUF file or alias
    python benchmarks/tl_compat.py --json out.json
    python benchmarks/tl_compat.py --layers 4       # keep the first 4 blocks: the patching sweeps (every layer x head x
                                                    # activation) then take minutes instead of an hour on a busy CPU

The calls are those TransformerLens's own demos make most (Main Demo, Exploratory Analysis, Activation Patching,
Attribution Patching, Head Detector) plus the usual "intro to mech interp" exercises, written here for a Llama-style
model (SmolLM2: 30 layers, 9 query heads on 3 KV heads). Only the loading line differs from TransformerLens code:
`model = load_model(...)` instead of `TransformerBridge.boot_transformers(...)` (+ `enable_compatibility_mode()`).
They run in order in one namespace, as a notebook would (`L` is the model's layer count, where a demo names a layer);
a call fails when it raises. Prompts are short so the
patching sweeps finish in minutes on a CPU. The script never asserts: it reports.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

# (demo, code): each entry is one call a user would type, with the lines it needs around it
CALLS: list[tuple[str, str]] = [
    # ---- Main Demo ---------------------------------------------------------------------------------------------------
    ("main", "n_layers = model.cfg.n_layers"),
    ("main", "n_heads = model.cfg.n_heads"),
    ("main", "d_model = model.cfg.d_model"),
    ("main", "device = model.cfg.device"),
    ("main", "text = 'Natural language processing tasks are typically approached with supervised learning.'\n"
             "tokens = model.to_tokens(text)"),
    ("main", "logits, cache = model.run_with_cache(tokens, remove_batch_dim=True)"),
    ("main", "attention_pattern = cache['pattern', 0, 'attn']"),
    ("main", "str_tokens = model.to_str_tokens(text)"),
    ("main", "attn_hook_name = 'blocks.0.attn.hook_pattern'\n"
             "_, attn_cache = model.run_with_cache(tokens, remove_batch_dim=True, names_filter=[attn_hook_name])\n"
             "attn = attn_cache[attn_hook_name]"),
    ("main", "loss = model(tokens, return_type='loss')"),
    ("main", "def head_ablation_hook(value, hook):\n"
             "    value[:, :, 0, :] = 0.0\n"
             "    return value\n"
             "ablated_loss = model.run_with_hooks(tokens, return_type='loss', "
             "fwd_hooks=[(utils.get_act_name('v', 1), head_ablation_hook)])"),
    ("main", "clean_prompt = 'After John and Mary went to the store, Mary gave a bottle of milk to'\n"
             "corrupted_prompt = 'After John and Mary went to the store, John gave a bottle of milk to'\n"
             "clean_tokens = model.to_tokens(clean_prompt)\n"
             "corrupted_tokens = model.to_tokens(corrupted_prompt)"),
    ("main", "correct_index = model.to_single_token(' John')\nincorrect_index = model.to_single_token(' Mary')"),
    ("main", "def logits_to_logit_diff(logits, correct_answer=' John', incorrect_answer=' Mary'):\n"
             "    return logits[0, -1, model.to_single_token(correct_answer)] - logits[0, -1, model.to_single_token(incorrect_answer)]\n"
             "clean_logits, clean_cache = model.run_with_cache(clean_tokens)\n"
             "clean_logit_diff = logits_to_logit_diff(clean_logits)"),
    ("main", "corrupted_logits = model(corrupted_tokens)\ncorrupted_logit_diff = logits_to_logit_diff(corrupted_logits)"),
    ("main", "def residual_stream_patching_hook(resid_pre, hook, position):\n"
             "    resid_pre[:, position, :] = clean_cache[hook.name][:, position, :]\n"
             "    return resid_pre\n"
             "num_positions = len(clean_tokens[0])\n"
             "ioi_patching_result = torch.zeros((model.cfg.n_layers, num_positions), device=model.cfg.device)\n"
             "for layer in range(0, model.cfg.n_layers, 2):\n"
             "    for position in range(num_positions):\n"
             "        temp_hook_fn = partial(residual_stream_patching_hook, position=position)\n"
             "        patched_logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(utils.get_act_name('resid_pre', layer), temp_hook_fn)])\n"
             "        ioi_patching_result[layer, position] = logits_to_logit_diff(patched_logits).detach()"),
    ("main", "token_labels = [f'{token}_{index}' for index, token in enumerate(model.to_str_tokens(clean_tokens))]"),
    ("main", "random_tokens = torch.randint(1000, 10000, (4, 20))\n"
             "bos = torch.full((4, 1), model.tokenizer.bos_token_id)\n"
             "repeated_tokens = torch.cat([bos, random_tokens, random_tokens], dim=1).to(model.cfg.device)\n"
             "repeated_logits = model(repeated_tokens)"),
    ("main", "correct_log_probs = model.loss_fn(repeated_logits, repeated_tokens, per_token=True)"),
    ("main", "loss_by_position = einops.reduce(correct_log_probs, 'batch position -> position', 'mean')"),
    ("main", "induction_score_store = torch.zeros((model.cfg.n_layers, model.cfg.n_heads), device=model.cfg.device)\n"
             "def induction_score_hook(pattern, hook):\n"
             "    stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - 20)\n"
             "    induction_score_store[hook.layer(), :] = einops.reduce(stripe, 'batch head_index position -> head_index', 'mean')\n"
             "pattern_hook_names_filter = lambda name: name.endswith('pattern')\n"
             "model.run_with_hooks(repeated_tokens, return_type=None, fwd_hooks=[(pattern_hook_names_filter, induction_score_hook)])"),
    ("main", "def visualize_pattern_hook(pattern, hook):\n"
             "    return None\n"
             "model.run_with_hooks(repeated_tokens[:1], return_type=None, "
             "fwd_hooks=[(utils.get_act_name('pattern', L - 1), visualize_pattern_hook)])"),
    ("main", "test_prompt = 'The quick brown fox jumped over the lazy dog'\nn_tokens = len(model.to_tokens(test_prompt)[0])"),
    ("main", "unembed_bias = model.unembed.b_U"),
    ("main", "bias_values, bias_indices = model.unembed.W_U.norm(dim=0).sort(descending=True)\n"
             "top = repr(model.to_string(bias_indices[0]))"),
    ("main", "example_text = 'The first thing you need to figure out is *how* things are tokenized.'\n"
             "example_text_str_tokens = model.to_str_tokens(example_text)"),
    ("main", "example_text_tokens = model.to_tokens(example_text)"),
    ("main", "example_multi_text = ['The cat sat on the mat.', 'The cat sat on the mat really hard.']\n"
             "example_multi_text_tokens = model.to_tokens(example_multi_text)"),
    ("main", "capital_the_token_index = model.to_single_token(' The')"),
    ("main", "s = model.to_string(256)"),
    ("main", "s = model.to_string(example_text_tokens.squeeze())"),
    ("main", "p = model.get_token_position(' cat', 'The cat sat on the mat')"),
    ("main", "p = model.get_token_position(' cat', 'The cat sat on the mat', prepend_bos=False)"),
    ("main", "p = model.get_token_position(' cat', 'The cat sat on the mat, and the cat was happy', mode='last')"),
    ("main", "s = model.to_str_tokens('2342+2017=21445')"),
    ("main", "ioi_logits_with_bos = model('Claire and Mary went to the shops, then Mary gave a bottle of milk to', prepend_bos=True)\n"
             "mary_logit = ioi_logits_with_bos[0, -1, model.to_single_token(' Mary')].item()"),
    ("main", "ioi_logits_without_bos = model('Claire and Mary went to the shops, then Mary gave a bottle of milk to', prepend_bos=False)"),
    ("main", "s = model.to_str_tokens(' Claire', prepend_bos=False)"),
    ("main", "OV_circuit_all_heads = model.OV"),
    ("main", "full_OV = model.embed.W_E[:200] @ model.blocks[1].attn.OV[0] @ model.unembed.W_U[:, :200]"),
    ("main", "out = model.generate('(CNN) President Barack Obama caught in embarrassing new scandal\\n', max_new_tokens=10, temperature=0.7)"),
    ("main", "out = model.generate(tokens, max_new_tokens=5, verbose=False)"),
    ("main", "for name, param in model.named_parameters():\n    pass"),
    # ---- Exploratory Analysis ----------------------------------------------------------------------------------------
    ("explore", "model.set_use_attn_result(True)"),
    ("explore", "utils.test_prompt('After John and Mary went to the store, John gave a bottle of milk to', ' Mary', model, "
                "prepend_bos=True, print_details=False)"),
    ("explore", "prompt_format = ['When John and Mary went to the shops,{} gave the bag to', "
                "'When Tom and James went to the park,{} gave the ball to']\n"
                "names = [(' Mary', ' John'), (' Tom', ' James')]\n"
                "prompts, answers = [], []\n"
                "for i in range(len(prompt_format)):\n"
                "    for j in range(2):\n"
                "        answers.append((names[i][j], names[i][1 - j]))\n"
                "        prompts.append(prompt_format[i].format(names[i][1 - j]))\n"
                "answer_tokens = torch.tensor([[model.to_single_token(a[0]), model.to_single_token(a[1])] for a in answers], device=model.cfg.device)"),
    ("explore", "str_tokens = model.to_str_tokens(prompts[0])"),
    ("explore", "tokens = model.to_tokens(prompts, prepend_bos=True)"),
    ("explore", "original_logits, cache = model.run_with_cache(tokens)"),
    ("explore", "def logits_to_ave_logit_diff(logits, answer_tokens, per_prompt=False):\n"
                "    final_logits = logits[:, -1, :]\n"
                "    answer_logits = final_logits.gather(dim=-1, index=answer_tokens)\n"
                "    answer_logit_diff = answer_logits[:, 0] - answer_logits[:, 1]\n"
                "    return answer_logit_diff if per_prompt else answer_logit_diff.mean()\n"
                "original_average_logit_diff = logits_to_ave_logit_diff(original_logits, answer_tokens)"),
    ("explore", "answer_residual_directions = model.tokens_to_residual_directions(answer_tokens)"),
    ("explore", "logit_diff_directions = answer_residual_directions[:, 0] - answer_residual_directions[:, 1]"),
    ("explore", "W_U = model.unembed.W_U"),
    ("explore", "final_residual_stream = cache['resid_post', -1]"),
    ("explore", "final_token_residual_stream = final_residual_stream[:, -1, :]"),
    ("explore", "scaled_final_token_residual_stream = cache.apply_ln_to_stack(final_token_residual_stream, layer=-1, pos_slice=-1)"),
    ("explore", "accumulated_residual, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)"),
    ("explore", "scaled = cache.apply_ln_to_stack(accumulated_residual, layer=-1, pos_slice=-1)"),
    ("explore", "per_layer_residual, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)"),
    ("explore", "per_head_residual, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)"),
    ("explore", "pattern = cache['attn', L - 1][0, 2]"),
    ("explore", "corrupted_prompts = []\n"
                "for i in range(0, len(prompts), 2):\n"
                "    corrupted_prompts.append(prompts[i + 1])\n"
                "    corrupted_prompts.append(prompts[i])\n"
                "corrupted_tokens = model.to_tokens(corrupted_prompts, prepend_bos=True)\n"
                "corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens, return_type='logits')"),
    ("explore", "s = model.to_string(corrupted_tokens)"),
    ("explore", "def patch_residual_component(corrupted_residual_component, hook, pos, clean_cache):\n"
                "    corrupted_residual_component[:, pos, :] = clean_cache[hook.name][:, pos, :]\n"
                "    return corrupted_residual_component\n"
                "def normalize_patched_logit_diff(patched_logit_diff):\n"
                "    return patched_logit_diff / original_average_logit_diff\n"
                "patched_residual_stream_diff = torch.zeros(model.cfg.n_layers, tokens.shape[1], device=model.cfg.device, dtype=torch.float32)\n"
                "for layer in range(0, model.cfg.n_layers, 2):\n"
                "    for position in range(tokens.shape[1]):\n"
                "        hook_fn = partial(patch_residual_component, pos=position, clean_cache=cache)\n"
                "        patched_logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(utils.get_act_name('resid_pre', layer), hook_fn)], return_type='logits')\n"
                "        patched_residual_stream_diff[layer, position] = normalize_patched_logit_diff(logits_to_ave_logit_diff(patched_logits, answer_tokens))"),
    ("explore", "for layer in range(0, model.cfg.n_layers, 2):\n"
                "    hook_fn = partial(patch_residual_component, pos=tokens.shape[1] - 1, clean_cache=cache)\n"
                "    patched_attn_logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(utils.get_act_name('attn_out', layer), hook_fn)])\n"
                "    patched_mlp_logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(utils.get_act_name('mlp_out', layer), hook_fn)])"),
    ("explore", "def patch_head_vector(corrupted_head_vector, hook, head_index, clean_cache):\n"
                "    corrupted_head_vector[:, :, head_index, :] = clean_cache[hook.name][:, :, head_index, :]\n"
                "    return corrupted_head_vector\n"
                "for head_index in range(model.cfg.n_heads):\n"
                "    hook_fn = partial(patch_head_vector, head_index=head_index, clean_cache=cache)\n"
                "    patched_logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(utils.get_act_name('z', L - 1, 'attn'), hook_fn)], return_type='logits')"),
    ("explore", "hook_fn = partial(patch_head_vector, head_index=1, clean_cache=cache)\n"
                "patched_logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(utils.get_act_name('v', L - 1, 'attn'), hook_fn)])"),
    ("explore", "def patch_head_pattern(corrupted_head_pattern, hook, head_index, clean_cache):\n"
                "    corrupted_head_pattern[:, head_index, :, :] = clean_cache[hook.name][:, head_index, :, :]\n"
                "    return corrupted_head_pattern\n"
                "hook_fn = partial(patch_head_pattern, head_index=4, clean_cache=cache)\n"
                "patched_logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(utils.get_act_name('attn', L - 1, 'attn'), hook_fn)])"),
    ("explore", "A_output = cache[utils.get_act_name('result', L - 1, 'attn')][:, :, 3, :]"),
    ("explore", "ln1_scale = corrupted_cache[utils.get_act_name('scale', L - 1, 'ln1')]"),
    ("explore", "example_repeated_text = 'Hello everyone, this is a test. ' * 3\n"
                "example_repeated_tokens = model.to_tokens(example_repeated_text, prepend_bos=True)\n"
                "example_repeated_logits, example_repeated_cache = model.run_with_cache(example_repeated_tokens)"),
    ("explore", "prev_token_scores = torch.zeros((model.cfg.n_layers, model.cfg.n_heads), device=model.cfg.device)\n"
                "def prev_token_hook(pattern, hook):\n"
                "    prev_token_scores[hook.layer()] = pattern.diagonal(-1, dim1=-2, dim2=-1).mean(-1).mean(0)\n"
                "loss = model.run_with_hooks(example_repeated_tokens, return_type='loss', fwd_hooks=[(lambda n: n.endswith('pattern'), prev_token_hook)])"),
    ("explore", "corner = utils.get_corner(prev_token_scores)"),
    ("explore", "def ablate_top_head_hook(z, hook):\n"
                "    z[:, -1, 2, :] = 0\n"
                "    return z\n"
                "model.blocks[L - 1].attn.hook_z.add_hook(ablate_top_head_hook)\n"
                "ablated_logits, ablated_cache = model.run_with_cache(tokens)\n"
                "model.reset_hooks()"),
    ("explore", "per_head_ablated_residual, labels = ablated_cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)"),
    ("explore", "ratio = cache['ln_final.hook_scale'][:, -1] / ablated_cache['ln_final.hook_scale'][:, -1]"),
    # ---- Activation Patching ----------------------------------------------------------------------------------------
    ("patching", "prompts = ['When John and Mary went to the shops, John gave the bag to', "
                 "'When John and Mary went to the shops, Mary gave the bag to']\n"
                 "clean_tokens = model.to_tokens(prompts)[:, -6:]\n"
                 "corrupted_tokens = clean_tokens[[1, 0]]\n"
                 "answer_token_indices = torch.tensor([[model.to_single_token(' Mary'), model.to_single_token(' John')], "
                 "[model.to_single_token(' John'), model.to_single_token(' Mary')]], device=model.cfg.device)"),
    ("patching", "s = model.to_string(clean_tokens[0])"),
    ("patching", "def get_logit_diff(logits, answer_token_indices=answer_token_indices):\n"
                 "    correct = logits[:, -1].gather(1, answer_token_indices[:, 0].unsqueeze(1))\n"
                 "    incorrect = logits[:, -1].gather(1, answer_token_indices[:, 1].unsqueeze(1))\n"
                 "    return (correct - incorrect).mean()\n"
                 "clean_logits, clean_cache = model.run_with_cache(clean_tokens)\n"
                 "corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens)\n"
                 "CLEAN_BASELINE = get_logit_diff(clean_logits).item()\n"
                 "CORRUPTED_BASELINE = get_logit_diff(corrupted_logits).item()\n"
                 "def ioi_metric(logits):\n"
                 "    return (get_logit_diff(logits) - CORRUPTED_BASELINE) / (CLEAN_BASELINE - CORRUPTED_BASELINE)"),
    ("patching", "resid_pre_act_patch_results = patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, ioi_metric)"),
    ("patching", "attn_out = patching.get_act_patch_attn_out(model, corrupted_tokens, clean_cache, ioi_metric)"),
    ("patching", "mlp_out = patching.get_act_patch_mlp_out(model, corrupted_tokens, clean_cache, ioi_metric)"),
    ("patching", "attn_head_out_all_pos_act_patch_results = patching.get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache, ioi_metric)"),
    ("patching", "ALL_HEAD_LABELS = [f'L{i}H{j}' for i in range(model.cfg.n_layers) for j in range(model.cfg.n_heads)]"),
    ("patching", "every_block_result = patching.get_act_patch_block_every(model, corrupted_tokens, clean_cache, ioi_metric)"),
    ("patching", "q_all = patching.get_act_patch_attn_head_q_all_pos(model, corrupted_tokens, clean_cache, ioi_metric)"),
    ("patching", "pattern_all = patching.get_act_patch_attn_head_pattern_all_pos(model, corrupted_tokens, clean_cache, ioi_metric)"),
    ("patching", "every_head_all_pos_act_patch_result = patching.get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, ioi_metric)"),
    ("patching", "x = [f'{tok} {i}' for i, tok in enumerate(model.to_str_tokens(clean_tokens[0]))]"),
    # ---- Attribution Patching ----------------------------------------------------------------------------------------
    ("attribution", "model.set_use_split_qkv_input(True)"),
    ("attribution", "filter_not_qkv_input = lambda name: '_input' not in name\n"
                    "def get_cache_fwd_and_bwd(model, tokens, metric):\n"
                    "    model.reset_hooks()\n"
                    "    cache = {}\n"
                    "    def forward_cache_hook(act, hook):\n"
                    "        cache[hook.name] = act.detach()\n"
                    "    model.add_hook(filter_not_qkv_input, forward_cache_hook, 'fwd')\n"
                    "    grad_cache = {}\n"
                    "    def backward_cache_hook(act, hook):\n"
                    "        grad_cache[hook.name] = act.detach()\n"
                    "    model.add_hook(filter_not_qkv_input, backward_cache_hook, 'bwd')\n"
                    "    value = metric(model(tokens))\n"
                    "    value.backward()\n"
                    "    model.reset_hooks()\n"
                    "    return value.item(), ActivationCache(cache, model), ActivationCache(grad_cache, model)\n"
                    "clean_value, clean_cache, clean_grad_cache = get_cache_fwd_and_bwd(model, clean_tokens, ioi_metric)\n"
                    "corrupted_value, corrupted_cache, corrupted_grad_cache = get_cache_fwd_and_bwd(model, corrupted_tokens, ioi_metric)\n"
                    "model.zero_grad(set_to_none=True)"),
    ("attribution", "clean_pattern = torch.stack([clean_cache['pattern', l] for l in range(model.cfg.n_layers)], dim=0)"),
    ("attribution", "clean_residual, residual_labels = clean_cache.accumulated_resid(-1, incl_mid=True, return_labels=True)\n"
                    "corrupted_residual = corrupted_cache.accumulated_resid(-1, incl_mid=True, return_labels=False)\n"
                    "corrupted_grad_residual = corrupted_grad_cache.accumulated_resid(-1, incl_mid=True, return_labels=False)\n"
                    "residual_attr = einops.reduce(corrupted_grad_residual * (clean_residual - corrupted_residual), "
                    "'component batch pos d_model -> component pos', 'sum')"),
    ("attribution", "clean_layer_out, labels = clean_cache.decompose_resid(-1, return_labels=True)"),
    ("attribution", "clean_head_out = clean_cache.stack_head_results(-1, return_labels=False)"),
    ("attribution", "grad_z = corrupted_grad_cache['z', L - 1]"),
    ("attribution", "ln_scales = clean_grad_cache['scale', L - 1, 'ln1']"),
    ("attribution", "loss, cache_with_grads = model.run_with_cache(clean_tokens, return_type='loss', incl_bwd=True, "
                    "names_filter=lambda n: n.endswith('hook_resid_post'))\n"
                    "g = cache_with_grads[f'blocks.{L - 1}.hook_resid_post_grad']\n"
                    "model.zero_grad(set_to_none=True)"),
    # ---- Head Detector -----------------------------------------------------------------------------------------------
    ("head_detector", "prompt = 'The head detector feature for TransformerLens allows users to check for various attention patterns'\n"
                      "head_scores = detect_head(model, prompt, 'previous_token_head')"),
    ("head_detector", "head_scores = detect_head(model, prompt, 'previous_token_head', exclude_bos=True, exclude_current_token=True)"),
    ("head_detector", "_, cache = model.run_with_cache(prompt)\nattention_pattern = cache['pattern', L - 1, 'attn'].squeeze(0)"),
    ("head_detector", "prompts = ['one two three one two three', 'cats dogs birds cats dogs birds']\n"
                      "head_scores = detect_head(model, prompts, 'duplicate_token_head', error_measure='abs')"),
    ("head_detector", "head_scores = detect_head(model, prompts, 'induction_head', exclude_bos=False, exclude_current_token=False, error_measure='abs')"),
    ("head_detector", "seq_len = len(model.to_str_tokens(prompt))\n"
                      "ones = torch.tril(torch.ones(seq_len, seq_len))\n"
                      "ones_head_scores = detect_head(model, prompt, ones, exclude_bos=False, exclude_current_token=False, error_measure='abs')"),
    # ---- the usual intro exercises -----------------------------------------------------------------------------------
    ("intro", "logits = model('The Eiffel Tower is in the city of')"),
    ("intro", "logits = model(['The Eiffel Tower is in', 'The Colosseum is in the city of'])"),
    ("intro", "loss = model('The Eiffel Tower is in Paris', return_type='loss', loss_per_token=True)"),
    ("intro", "logits, loss = model('The Eiffel Tower is in Paris', return_type='both')"),
    ("intro", "logits, cache = model.run_with_cache('The Eiffel Tower is in Paris')"),
    ("intro", "resid = cache['resid_pre', L - 1]"),
    ("intro", "q = cache['q', 1]\nk = cache['k', 1]\nz = cache['z', 1]"),
    ("intro", "post = cache['post', L - 1]\npre = cache['pre', L - 1, 'mlp']"),
    ("intro", "stack = cache.stack_activation('resid_post')"),
    ("intro", "accumulated = cache.accumulated_resid(apply_ln=True, pos_slice=-1)"),
    ("intro", "logit_lens = model.unembed(model.ln_final(cache['resid_post', L - 2]))"),
    ("intro", "cache_cpu = cache.to('cpu')"),
    ("intro", "single = cache.remove_batch_dim()"),
    ("intro", "keys = [k for k in cache.keys() if 'hook_resid' in k]"),
    ("intro", "resid_mid = model(model.to_tokens('The Eiffel Tower'), stop_at_layer=L - 1)\n"
              "logits = model(resid_mid, start_at_layer=L - 1)"),
    ("intro", "with model.hooks(fwd_hooks=[('blocks.0.hook_resid_post', lambda t, hook: t)]):\n    logits = model('hello')"),
    ("intro", "names = list(model.hook_dict.keys())"),
    ("intro", "m = model.mod_dict['blocks.0.attn']"),
    ("intro", "model.add_hook('blocks.1.hook_mlp_out', lambda t, hook: t * 1.0)\nlogits = model('hello')\nmodel.reset_hooks()"),
    ("intro", "W_Q = model.W_Q\nW_O = model.W_O"),
    ("intro", "W_K = model.blocks[0].attn.W_K"),
    ("intro", "W_out = model.blocks[0].mlp.W_out"),
    ("intro", "QK = model.QK[0, 0]"),
    ("intro", "bias = model.accumulated_bias(L - 1)"),
    ("intro", "acc = utils.lm_accuracy(logits, model.to_tokens('hello'))"),
    ("intro", "ce = utils.lm_cross_entropy_loss(model('Paris is the capital of France'), model.to_tokens('Paris is the capital of France'))"),
    ("intro", "s = model.to_single_str_token(42)"),
    ("intro", "d = model.tokens_to_residual_directions(' Paris')"),
    ("intro", "cfg_fields = (model.cfg.d_vocab, model.cfg.d_head, model.cfg.n_ctx, model.cfg.act_fn, model.cfg.normalization_type, "
              "model.cfg.positional_embedding_type, model.cfg.default_prepend_bos, model.cfg.model_name, model.cfg.d_mlp)"),
    ("intro", "out = model.generate('The Eiffel Tower is in', max_new_tokens=5, return_type='tokens')"),
    ("intro", "out = model.generate(['Paris is', 'The capital of Italy is'], max_new_tokens=5)"),
    ("intro", "out = model.generate('Paris is', max_new_tokens=5, do_sample=True, top_k=50, top_p=0.9, temperature=0.8)"),
    ("intro", "logit_attrs = cache.logit_attrs(cache.decompose_resid(pos_slice=-1), tokens=model.to_single_token(' Paris'), pos_slice=-1)"),
    ("intro", "full = cache.get_full_resid_decomposition(expand_neurons=False, pos_slice=-1)"),
    ("intro", "neurons = cache.stack_neuron_results(L - 1, pos_slice=-1)"),
]


def run(model_source: str, layers: int | None = None) -> dict:
    import einops  # noqa: F401 - the demos' namespace
    import transformer_lens.utilities as utils
    from functools import partial
    from transformer_lens import ActivationCache, patching
    from transformer_lens.head_detector import detect_head

    from residscope.model import load_model

    model = load_model(model_source)  # the one line that differs from TransformerLens code
    if layers is not None:
        model.keep_blocks(range(layers))
    namespace = dict(torch=torch, einops=einops, utils=utils, partial=partial, ActivationCache=ActivationCache,
                     patching=patching, detect_head=detect_head, model=model, L=model.cfg.n_layers)
    results = []
    for demo, code in CALLS:
        start = time.perf_counter()
        try:
            exec(code, namespace)  # noqa: S102 - the calls are the fixed strings above
            error = None
        except Exception as e:  # noqa: BLE001 - a failure is what this script counts
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
            if model.training or any(p.grad is not None for p in model.parameters()):
                model.zero_grad(set_to_none=True)
            model.reset_hooks(including_permanent=True)
        results.append(dict(demo=demo, code=code.splitlines()[-1].strip(), ok=error is None, error=error,
                            seconds=round(time.perf_counter() - start, 2)))
        mark = "ok  " if error is None else "FAIL"
        print(f"{mark} {demo:13s} {results[-1]['code'][:90]}" + (f"\n     -> {error}" if error else ""), flush=True)
    return dict(model=model_source, layers=model.cfg.n_layers, results=results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", help="write the per-call results here")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (faster sweeps)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args.model, args.layers)
    results = report["results"]
    ok = sum(r["ok"] for r in results)
    print()
    for demo in dict.fromkeys(r["demo"] for r in results):
        mine = [r for r in results if r["demo"] == demo]
        print(f"{demo:13s} {sum(r['ok'] for r in mine):3d} / {len(mine):3d} unchanged")
    print(f"{'total':13s} {ok:3d} / {len(results):3d} unchanged ({100 * ok / len(results):.0f}%)")
    if args.json:
        from residscope.common.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
