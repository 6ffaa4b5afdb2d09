"""TransformerLens code runs unchanged on residscope: calls written the way TransformerLens's demos write them (Main Demo,
Exploratory Analysis, Activation Patching, Head Detector), on tiny random models of every family and on the bundled
SmolLM2, with the numbers checked against hand computations.

Families: Llama with GQA, Qwen2 (q/k/v biases, no BOS by default), Mistral with a window shorter than the prompts,
Gemma 3 (local/global layers, (1 + w) norms) and Baichuan 2 with ALiBi. Every tiny model gets a character-level
tokenizer whose BOS / EOS / pad arrangement is chosen per test: pad of its own, pad == EOS (SmolLM2), pad == EOS == BOS,
and one that adds BOS by itself (Llama 2, Gemma).
"""

from __future__ import annotations

import string

import pytest
import torch
import torch.nn.functional as F
import transformer_lens.patching as patching
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from torch.testing import assert_close
from transformer_lens import ActivationCache
from transformer_lens.config import TransformerLensConfig
from transformer_lens.head_detector import detect_head
from transformer_lens.model_protocol import TransformerLensModel
from transformer_lens.utilities import get_act_name, get_attention_mask
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

from conftest import randomize_norms, save_hf
from residscope.model import load_model
from residscope.model.config import FULL, SLIDING
from residscope.model.tokens import left_padding_mask

VOCAB = 128
CHARS = string.ascii_letters + string.digits + " .,!?'-:;"
UNK, BOS, EOS, PAD = 0, 1, 2, 3
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
TEXTS = ["Hi.", "The cat sat on the mat, quietly."]


def char_tokenizer(*, pad: str = "own", adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """One token per character (ids 4..), specials <unk>=0 <s>=1 </s>=2 <pad>=3.

    pad: "own" (<pad>), "eos" (pad is </s>, as in SmolLM2) or "shared" (BOS, EOS and pad are all </s>).
    adds_bos: the tokenizer puts <s> in front by itself (Llama 2 / Gemma style)."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + list(CHARS))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    names = {"own": ("<s>", "</s>", "<pad>"), "eos": ("<s>", "</s>", "</s>"), "shared": ("</s>", "</s>", "</s>")}[pad]
    bos, eos, pad_token = names
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, specials.index(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad_token, unk_token="<unk>")


SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rope_theta=1000.0, bos_token_id=BOS, eos_token_id=EOS)


def _hf_folder(tmp_path_factory, family: str):
    torch.manual_seed(0)
    if family == "llama_gqa":
        hf = LlamaForCausalLM(LlamaConfig(**SMALL))
    elif family == "qwen2_bias":
        hf = Qwen2ForCausalLM(Qwen2Config(**SMALL))
    elif family == "mistral_window":
        hf = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=6))
    elif family == "gemma3":
        cfg = Gemma3TextConfig(**{**SMALL, "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 6,
                                  "layer_types": [SLIDING, FULL, SLIDING]})
        hf = Gemma3ForCausalLM(cfg)
    else:
        raise AssertionError(family)
    randomize_norms(hf)
    return save_hf(hf.eval(), tmp_path_factory.mktemp(family))


def _baichuan_folder(tmp_path_factory):
    from test_baichuan import write_checkpoint

    folder = tmp_path_factory.mktemp("baichuan_alibi")
    write_checkpoint(folder, "alibi", n_heads=4)
    return folder


FAMILIES = ["llama_gqa", "qwen2_bias", "mistral_window", "gemma3", "baichuan_alibi"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory):
    folder = _baichuan_folder(tmp_path_factory) if request.param == "baichuan_alibi" else _hf_folder(tmp_path_factory, request.param)
    m = load_model(folder, load_tokenizer=False)
    m.tokenizer = char_tokenizer()
    return m


@pytest.fixture
def llama(tmp_path_factory):
    m = load_model(_hf_folder(tmp_path_factory, "llama_gqa"), load_tokenizer=False)
    m.tokenizer = char_tokenizer()
    return m


def logit_diff(logits: torch.Tensor, right: int, wrong: int) -> torch.Tensor:
    return logits[:, -1, right].mean() - logits[:, -1, wrong].mean()


# ---------------------------------------------------------------------------------------------------------------------
# 1. cache, return types, loss, start/stop
# ---------------------------------------------------------------------------------------------------------------------
def test_run_with_cache_gives_an_activation_cache(model):
    tokens = model.to_tokens(CLEAN)
    logits, cache = model.run_with_cache(tokens)
    assert isinstance(cache, ActivationCache) and isinstance(model, TransformerLensModel)
    n_pos = tokens.shape[1]
    assert cache["pattern", 0].shape == (1, model.cfg.n_heads, n_pos, n_pos)
    assert_close(cache["pattern", 0, "attn"].sum(-1), torch.ones(1, model.cfg.n_heads, n_pos))
    assert torch.equal(cache["resid_pre", 2], cache["blocks.2.hook_resid_pre"])
    assert torch.equal(cache[get_act_name("z", 1)], cache["blocks.1.attn.hook_z"])
    assert "blocks.0.attn.hook_pattern" in cache and len(cache) == len(list(cache.keys()))

    # accumulated_resid without apply_ln: the residual stream before every layer, then the final one
    resid, labels = cache.accumulated_resid(return_labels=True)
    assert labels[-1] == "final_post" and resid.shape == (model.cfg.n_layers + 1, 1, n_pos, model.cfg.d_model)
    for layer in range(model.cfg.n_layers):
        assert torch.equal(resid[layer], cache["resid_pre", layer])
    assert torch.equal(resid[-1], cache["resid_post", model.cfg.n_layers - 1])
    final = model.unembed_residual(model.ln_final(resid[-1]))
    assert_close(final, logits)

    _, single = model.run_with_cache(tokens, remove_batch_dim=True)
    assert single["pattern", 1].shape == (model.cfg.n_heads, n_pos, n_pos)


def test_names_filter_forms_and_unknown_names(llama):
    for names_filter in ("blocks.1.hook_resid_post", ["blocks.1.hook_resid_post"], lambda name: name == "blocks.1.hook_resid_post"):
        _, cache = llama.run_with_cache(CLEAN, names_filter=names_filter)
        assert list(cache.keys()) == ["blocks.1.hook_resid_post"]
    with pytest.raises(ValueError, match=r"names_filter: 'blocks.99.hook_resid_post' is not a hook of this model") as e:
        llama.run_with_cache(CLEAN, names_filter="blocks.99.hook_resid_post")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="names_filter"):
        llama.run_with_cache(CLEAN, names_filter=["blocks.0.hook_resid_pre", "hook_nope"])
    with pytest.raises(ValueError, match="return_type='loss'"):
        llama.run_with_cache(CLEAN, incl_bwd=True)


def test_incl_bwd_caches_gradients(llama):
    loss, cache = llama.run_with_cache(CLEAN, return_type="loss", incl_bwd=True,
                                       names_filter=lambda n: n.endswith("hook_resid_post"))
    assert loss.dim() == 0
    grad = cache["blocks.1.hook_resid_post_grad"]
    assert grad.shape == cache["blocks.1.hook_resid_post"].shape and grad.abs().sum() > 0
    llama.zero_grad(set_to_none=True)


def test_loss_equals_cross_entropy_by_hand(model):
    tokens = model.to_tokens(CLEAN)
    logits, loss = model(tokens, return_type="both")
    by_hand = F.cross_entropy(logits[0, :-1].double(), tokens[0, 1:])
    assert_close(loss.double(), by_hand, atol=1e-5, rtol=1e-5)
    assert_close(model(CLEAN, return_type="loss"), loss)
    per_token = model(tokens, return_type="loss", loss_per_token=True)
    assert per_token.shape == (1, tokens.shape[1] - 1)
    assert_close(per_token, model.loss_fn(logits, tokens, per_token=True))
    assert model(tokens, return_type=None) is None


def test_loss_of_padded_batch_counts_only_real_tokens(model):
    for side in ("right", "left"):
        tokens = model.to_tokens(TEXTS, padding_side=side)
        mask = (tokens != model.tokenizer.pad_token_id).long()  # char tokenizer: <pad> never occurs in text
        loss = model(TEXTS, return_type="loss", padding_side=side)
        logits = model(TEXTS, padding_side=side)
        nll, count = 0.0, 0
        for row, m in zip(range(len(TEXTS)), mask):
            real = m.bool()
            row_logits, row_tokens = logits[row][real], tokens[row][real]
            nll += F.cross_entropy(row_logits[:-1].double(), row_tokens[1:], reduction="sum")
            count += int(real.sum()) - 1
        assert_close(loss.double(), nll / count, atol=1e-5, rtol=1e-5)
        assert_close(model.loss_fn(logits, tokens, attention_mask=mask), loss)


def test_start_and_stop_at_layer(model):
    tokens = model.to_tokens(CLEAN)
    logits = model(tokens)
    for layer in (0, 1, model.cfg.n_layers - 1):
        resid = model(tokens, stop_at_layer=layer)  # [batch, pos, d_model]
        assert_close(model(resid, start_at_layer=layer), logits)
        _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.hook_resid_pre")
        assert_close(resid, cache["resid_pre", layer])
    middle = model(model(tokens, stop_at_layer=1), start_at_layer=1, stop_at_layer=2)
    assert_close(middle, model(tokens, stop_at_layer=2))
    assert_close(model(resid, start_at_layer=model.cfg.n_layers - 1, tokens=tokens, return_type="loss"),
                 model(tokens, return_type="loss"))
    with pytest.raises(ValueError, match="tokens="):
        model(resid, start_at_layer=1, return_type="loss")
    with pytest.raises(ValueError, match="residual stream"):
        model(tokens, start_at_layer=1)


# ---------------------------------------------------------------------------------------------------------------------
# 2-3. strings, tokens, BOS and padding
# ---------------------------------------------------------------------------------------------------------------------
def test_strings_everywhere(model):
    tokens = model.to_tokens(CLEAN)
    assert_close(model(CLEAN), model(tokens))
    logits, cache = model.run_with_cache(CLEAN)
    # caching hook_pattern takes the explicit attention path, the plain forward SDPA: float32 rounding apart (ALiBi's
    # bias added before or inside the kernel differed by 2e-5 once)
    assert_close(logits, model(tokens), atol=1e-4, rtol=1e-4)
    seen = []
    model.run_with_hooks(CLEAN, fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, hook: seen.append(t.shape))])
    assert seen == [(1, tokens.shape[1], model.cfg.d_model)]
    assert model.to_str_tokens(CLEAN)[-3:] == [" ", "t", "o"]
    assert model.to_string(tokens[0, -2:]) == "to"
    assert model.to_string(tokens[0, -1]) == "o" and model.to_string([4 + CHARS.index("o")]) == "o"
    assert model.to_string(tokens[:, -2:]) == ["to"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_texts_equal_unpadded(model, side):
    batched = model(TEXTS, padding_side=side)  # [2, pos, vocab]
    tokens = model.to_tokens(TEXTS, padding_side=side)
    for row, text in enumerate(TEXTS):
        alone = model(text)[0]  # [pos_i, vocab]
        n = alone.shape[0]
        real = slice(tokens.shape[1] - n, None) if side == "left" else slice(0, n)
        assert_close(batched[row, real], alone, atol=1e-4, rtol=1e-4)


def test_left_padded_ids_get_the_mask_or_are_refused(llama):
    tokens = llama.to_tokens(TEXTS, padding_side="left")
    reference = llama(TEXTS, padding_side="left")
    with pytest.raises(ValueError, match=r"row\(s\) start with the pad token .* attention_mask") as e:
        llama(tokens)
    assert "\n" not in str(e.value)
    assert_close(llama(tokens, padding_side="left"), reference)
    llama.tokenizer.padding_side = "left"  # TransformerLens's switch: the model then infers the mask itself
    assert_close(llama(tokens), reference)
    assert_close(llama.to_tokens(TEXTS), tokens)
    # right padding needs no mask for the logits of real tokens (causal attention never looks right)
    llama.tokenizer.padding_side = "right"
    right = llama.to_tokens(TEXTS)
    assert_close(llama(right)[0, :4], llama(TEXTS[0])[0])


@pytest.mark.parametrize("pad", ["own", "eos", "shared"])
@pytest.mark.parametrize("adds_bos", [False, True])
def test_bos_never_doubled_and_mask_mirrors_transformer_lens(llama, pad, adds_bos):
    tok = char_tokenizer(pad=pad, adds_bos=adds_bos)
    llama.tokenizer = tok
    assert llama.cfg.tokenizer_prepends_bos is adds_bos and llama.cfg.default_prepend_bos
    bos = tok.bos_token_id
    with_bos = llama.to_tokens("ab")
    assert with_bos[0].tolist() == [bos, 4 + CHARS.index("a"), 4 + CHARS.index("b")]
    assert llama.to_tokens("ab", prepend_bos=False)[0].tolist() == with_bos[0, 1:].tolist()
    assert llama.to_str_tokens("ab", prepend_bos=False) == ["a", "b"]
    assert llama.to_single_token("a") == 4 + CHARS.index("a")
    # the mask residscope infers for left padding is TransformerLens's get_attention_mask
    tokens = llama.to_tokens(["a", "abcd", "abc"], padding_side="left")
    for prepend_bos in (True, False):
        theirs = get_attention_mask(tok, tokens, prepend_bos=prepend_bos, padding_side="left")
        ours = left_padding_mask(tokens, tok.pad_token_id, bos_is_pad=tok.bos_token_id == tok.pad_token_id, prepend_bos=prepend_bos)
        assert torch.equal(ours, theirs)
    _, mask = llama._tokenize(["a", "abcd", "abc"], None, "left")
    assert torch.equal(mask, get_attention_mask(tok, tokens, prepend_bos=True, padding_side="left"))
    assert_close(llama(tokens, padding_side="left")[0, -1], llama("a")[0, -1], atol=1e-5, rtol=1e-5)
    if pad == "shared":  # one BOS that shares the pad id is not padding
        assert_close(llama(with_bos), llama("ab"))


def test_qwen2_adds_no_bos_by_default(tmp_path_factory):
    m = load_model(_hf_folder(tmp_path_factory, "qwen2_bias"), load_tokenizer=False)
    m.tokenizer = char_tokenizer()
    assert m.cfg.default_prepend_bos is False and m.to_tokens("ab").shape == (1, 2)
    m.cfg.default_prepend_bos = True  # settable, as in TransformerLens
    assert m.to_tokens("ab")[0, 0] == BOS


def test_token_helpers(llama):
    assert llama.get_token_position("a", "banana") == 2  # BOS at 0
    assert llama.get_token_position("a", "banana", mode="last", prepend_bos=False) == 5
    assert llama.get_token_position(4 + CHARS.index("n"), llama.to_tokens("banana")) == 3
    with pytest.raises(ValueError, match="not a single token"):
        llama.to_single_token("ab")
    with pytest.raises(ValueError, match="does not occur"):
        llama.get_token_position("z", "banana")
    assert llama.to_str_tokens(["ab", "c"]) == [["<s>", "a", "b"], ["<s>", "c"]]
    directions = llama.tokens_to_residual_directions(torch.tensor([5, 6]))  # [2, d_model]
    # W_U's columns times ln_final's gain: residscope does not fold the norm into W_U (exact DLA: test_transformer_lens_weights)
    assert torch.equal(directions, llama.unembed.weight[[5, 6]] * llama.ln_final.weight)
    assert llama.tokens_to_residual_directions("a").shape == (llama.cfg.d_model,)
    assert llama.to_tokens("a" * 500).shape[1] == llama.cfg.n_ctx  # truncated to the context
    assert llama.to_tokens("a" * 500, truncate=False).shape[1] == 501


# ---------------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------------
def test_generate_with_strings(llama):
    out = llama.generate("The cat", max_new_tokens=5)
    assert isinstance(out, str) and out.startswith("The cat") and not out.startswith("<s>")
    tokens = llama.generate("The cat", max_new_tokens=5, return_type="tokens", stop_at_eos=False)
    assert tokens.shape == (1, 8 + 5) and tokens[0, 0] == BOS
    assert llama.to_string(tokens[0, 1:]) == out or llama.cfg.eos_token_id in tokens[0].tolist()
    assert torch.equal(llama.generate(llama.to_tokens("The cat"), max_new_tokens=5, stop_at_eos=False), tokens)
    both = llama.generate(["Hi", "The cat"], max_new_tokens=4, stop_at_eos=False)
    assert both[1] == llama.generate("The cat", max_new_tokens=4, stop_at_eos=False)
    assert both[0] == llama.generate("Hi", max_new_tokens=4, stop_at_eos=False)
    assert llama.generate("The cat", max_new_tokens=3, return_type="str", verbose=True, use_past_kv_cache=False) == \
        llama.generate("The cat", max_new_tokens=3)
    # stop_at_eos: with EOS forced as the first new token, generation stops there (rows padded with EOS), or goes on
    first = int(llama("The cat")[0, -1].argmax())
    stopped = llama.generate("The cat", max_new_tokens=4, eos_token_id=first, return_type="tokens")
    assert stopped.shape == (1, 9) and stopped[0, -1] == first
    assert llama.generate("The cat", max_new_tokens=4, eos_token_id=first, stop_at_eos=False, return_type="tokens").shape == (1, 12)


# ---------------------------------------------------------------------------------------------------------------------
# bad input (issue 14): one line naming the argument and the valid range
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ids, match", [
    (torch.tensor([[1, VOCAB]]), rf"token id {VOCAB}, outside the vocabulary \[0, {VOCAB - 1}\]"),
    (torch.tensor([[1, -3]]), r"token id -3, outside the vocabulary"),
    (torch.zeros(1, 0, dtype=torch.long), r"input is empty \(shape \(1, 0\)\)"),
    (torch.zeros(1, 4), r"input must be integer token ids, got dtype torch.float32"),
    (torch.zeros(1, 4, dtype=torch.long, device="meta"), r"input is on the meta device"),
])
def test_bad_ids_are_refused_in_one_line(llama, ids, match):
    with pytest.raises(ValueError, match=match) as e:
        llama(ids)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(do_sample=True, temperature=float("nan")), r"temperature must be a finite number >= 0"),
    (dict(do_sample=True, temperature=-1.0), r"temperature must be a finite number >= 0"),
    (dict(do_sample=True, top_k=0), r"top_k must be an integer >= 1"),
    (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=-1), r"max_new_tokens must be an integer >= 0"),
    (dict(return_type="logits"), r"return_type must be 'input', 'str' or 'tokens'"),
])
def test_bad_generation_settings_are_refused(llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        llama.generate("The cat", **kwargs)


def test_bad_forward_arguments(llama):
    with pytest.raises(ValueError, match="return_type must be one of"):
        llama(CLEAN, return_type="logit")
    with pytest.raises(TypeError, match="attention_mask is keyword-only"):
        llama(llama.to_tokens(CLEAN), torch.ones(1, 5))


# ---------------------------------------------------------------------------------------------------------------------
# 4. config fields
# ---------------------------------------------------------------------------------------------------------------------
def test_config_carries_transformer_lens_fields(model):
    cfg = model.cfg
    for name in TransformerLensConfig.__dataclass_fields__:
        getattr(cfg, name)
    assert cfg.normalization_type == "RMS" and cfg.final_rms and cfg.gated_mlp and not cfg.attn_only
    assert cfg.positional_embedding_type == ("alibi" if cfg.model_type == "baichuan" else "rotary")
    assert cfg.n_key_value_heads == cfg.n_kv_heads and cfg.d_vocab_out == cfg.d_vocab == VOCAB
    assert cfg.eps == cfg.norm_eps and cfg.n_devices == 1 and isinstance(cfg.n_ctx, int)
    assert cfg.act_fn == ("gelu_pytorch_tanh" if cfg.model_type == "gemma3_text" else "silu")
    assert cfg.use_attn_result is False and cfg.use_split_qkv_input is False and cfg.use_hook_tokens is False
    if cfg.positional == "rope":
        assert cfg.rotary_base == cfg.rope.get(FULL, cfg.rope.get(SLIDING)).theta and cfg.rotary_dim == cfg.d_head
    assert cfg.original_architecture.endswith("ForCausalLM")
    assert cfg.device == torch.device("cpu") and cfg.dtype == torch.float32


@pytest.mark.parametrize("family, divisor", [("llama_gqa", 16**0.5), ("gemma3", 24**0.5)])
def test_attn_scale_is_transformer_lens_divisor(tmp_path_factory, family, divisor):
    """cfg.attn_scale means what it means in TransformerLens: attention scores are q·k DIVIDED by it (sqrt(d_head),
    Gemma's sqrt(query_pre_attn_scalar)); residscope's multiplier is cfg.scale."""
    m = load_model(_hf_folder(tmp_path_factory, family), load_tokenizer=False)
    assert m.cfg.attn_scale == pytest.approx(divisor) and m.cfg.use_attn_scale
    assert m.cfg.scale == pytest.approx(1 / divisor)
    ids = torch.randint(4, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    _, cache = m.run_with_cache(ids, names_filter=lambda n: n.startswith("blocks.1.attn.hook_"))
    q, k = cache["blocks.1.attn.hook_rot_q"], cache["blocks.1.attn.hook_rot_k"]  # [batch, pos, head(_kv), d_head]
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / m.cfg.attn_scale  # [batch, head, q_pos, k_pos]
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    assert_close(cache["blocks.1.attn.hook_attn_scores"][..., causal], scores[..., causal], atol=1e-5, rtol=1e-5)


def test_unscaled_attention_reports_no_attn_scale():
    from residscope.model.config import DecoderConfig

    neo = DecoderConfig.from_hf({"model_type": "gpt_neo", "vocab_size": VOCAB, "hidden_size": 64, "num_layers": 2,
                                 "num_heads": 4, "max_position_embeddings": 32,
                                 "attention_types": [[["global", "local"], 1]]})
    assert neo.attn_scale == 1.0 and not neo.use_attn_scale and neo.attn_multiplier == 1.0


def test_config_follows_to_and_surgery(llama):
    llama.to(torch.float64)
    assert llama.cfg.dtype == torch.float64
    tokens = llama.to_tokens(CLEAN)
    assert llama(tokens).dtype == torch.float64
    llama.cfg = llama.cfg.replace(sliding_window=None)  # what surgery does: the live state moves with the model
    assert llama.cfg.dtype == torch.float64 and llama.cfg.tokenizer_prepends_bos is False
    llama.to(torch.float32)
    assert llama.cfg.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# TransformerLens's analysis helpers against hand-written loops
# ---------------------------------------------------------------------------------------------------------------------
def _patching_inputs(model):
    """The last 5 characters of the IOI-style prompts: a sweep over every (layer, position, head) stays small."""
    clean, corrupt = model.to_tokens(CLEAN)[:, -5:], model.to_tokens(CORRUPT)[:, -5:]
    right, wrong = model.to_single_token("M"), model.to_single_token("J")
    return clean, corrupt, lambda logits: logit_diff(logits, right, wrong)


def test_patching_resid_pre_equals_hand_loop(model):
    clean, corrupt, metric = _patching_inputs(model)
    _, clean_cache = model.run_with_cache(clean)
    result = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)  # [layer, pos]
    by_hand = torch.zeros(model.cfg.n_layers, clean.shape[1])
    for layer in range(model.cfg.n_layers):
        for pos in range(clean.shape[1]):
            def put_back(resid, hook, pos=pos):
                resid[:, pos] = clean_cache[hook.name][:, pos]
                return resid

            logits = model.run_with_hooks(corrupt, fwd_hooks=[(get_act_name("resid_pre", layer), put_back)])
            by_hand[layer, pos] = metric(logits)
    assert_close(result, by_hand)


def test_patching_head_out_by_pos_equals_hand_loop(model):
    clean, corrupt, metric = _patching_inputs(model)
    _, clean_cache = model.run_with_cache(clean)
    result = patching.get_act_patch_attn_head_out_by_pos(model, corrupt, clean_cache, metric)  # [layer, pos, head]
    assert result.shape == (model.cfg.n_layers, clean.shape[1], model.cfg.n_heads)
    layer, pos, head = model.cfg.n_layers - 1, clean.shape[1] - 2, 1

    def put_back(z, hook):
        z[:, pos, head] = clean_cache[hook.name][:, pos, head]
        return z

    assert_close(result[layer, pos, head], metric(model.run_with_hooks(corrupt, fwd_hooks=[(get_act_name("z", layer), put_back)])))


def test_head_detector_matches_its_definition(model):
    prompt = "abcab abcab"
    scores = detect_head(model, prompt, "previous_token_head", exclude_bos=False, exclude_current_token=False,
                         error_measure="mul")  # [layer, head]
    _, cache = model.run_with_cache(prompt)
    for layer in range(model.cfg.n_layers):
        pattern = cache["pattern", layer][0]  # [head, q, k]
        previous = torch.diagonal(pattern, offset=-1, dim1=-2, dim2=-1).sum(-1) / pattern.sum((-1, -2))
        assert_close(scores[layer].float(), previous.float(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# the bundled SmolLM2 (pad == EOS, BOS prepended by to_tokens)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(real_model):
    """conftest's session-wide SmolLM2 (loaded once; these tests do not change it)."""
    return real_model


@pytest.mark.real
def test_smollm2_tokens_loss_and_padding(smollm2):
    m = smollm2
    assert m.cfg.default_prepend_bos and not m.cfg.tokenizer_prepends_bos
    assert m.to_str_tokens("Hello world") == ["<|im_start|>", "Hello", " world"]
    assert m.to_single_token(" Paris") == m.to_tokens(" Paris", prepend_bos=False).item()
    tokens = m.to_tokens("The capital of France is Paris")
    logits, loss = m(tokens, return_type="both")
    assert_close(loss, F.cross_entropy(logits[0, :-1], tokens[0, 1:]))
    texts = ["Paris is", "The Eiffel tower stands in the city of"]
    for side in ("left", "right"):
        batched = m(texts, padding_side=side)
        padded = m.to_tokens(texts, padding_side=side)
        real = m._tokenize(texts, None, side)[1].bool()  # [batch, pos]; logits at padding are not compared
        assert_close(m(padded, padding_side=side)[real], batched[real], atol=1e-4, rtol=1e-4)
        alone = m(texts[0])[0, -1]
        last = -1 if side == "left" else m.to_tokens(texts[0]).shape[1] - 1
        assert_close(batched[0, last], alone, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="pad token"):
        m(m.to_tokens(texts, padding_side="left"))


@pytest.mark.real
@pytest.mark.slow  # a 150-forward patching sweep over the 30 layers: ~100 s of CPU
def test_smollm2_demo_calls(smollm2):
    m = smollm2
    clean, corrupt = m.to_tokens("When John and Mary went to the shops, John gave the bag to"), \
        m.to_tokens("When John and Mary went to the shops, Mary gave the bag to")
    assert clean.shape == corrupt.shape
    right, wrong = m.to_single_token(" Mary"), m.to_single_token(" John")
    logits, cache = m.run_with_cache(clean)
    assert cache["pattern", 0].shape == (1, 9, clean.shape[1], clean.shape[1])
    assert m.generate("The capital of France is", max_new_tokens=3).startswith("The capital of France is Paris")

    def metric(lg):
        return lg[0, -1, right] - lg[0, -1, wrong]

    # the last 5 tokens (" John" / " Mary", " gave", " the", " bag", " to") keep the sweep at 30 layers x 5 positions
    short_clean, short_corrupt = clean[:, -5:], corrupt[:, -5:]
    assert short_clean[0, 0] != short_corrupt[0, 0] and torch.equal(short_clean[0, 1:], short_corrupt[0, 1:])
    _, short_cache = m.run_with_cache(short_clean)
    result = patching.get_act_patch_resid_pre(m, short_corrupt, short_cache, metric)  # [layer, pos]
    for layer in (0, 15, 29):
        def put_back(resid, hook):
            resid[:, 0] = short_cache[hook.name][:, 0]
            return resid

        patched = m.run_with_hooks(short_corrupt, fwd_hooks=[(get_act_name("resid_pre", layer), put_back)])
        assert_close(result[layer, 0], metric(patched))


def smollm2_like_tokenizer() -> PreTrainedTokenizerFast:
    """BOS == EOS == id 0 and no pad token, so the pad id falls back to 0 (SmolLM2's arrangement); chars from id 4."""
    specials = ["<|endoftext|>", "<unk>", "<x>", "<y>"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + list(CHARS))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("tokenizer_side", ["right", "left"])
def test_ids_sharing_the_fallback_pad_id_are_not_padding(llama, tokenizer_side):
    """A BOS or a document separator that shares the (EOS fallback) pad id is a token: ids the caller did not pad get
    no inferred mask, whatever the tokenizer's side; a batch to_tokens padded on the left still gets its mask."""
    llama.tokenizer = smollm2_like_tokenizer()
    llama.tokenizer.padding_side = tokenizer_side
    assert llama.tokenizer.pad_token_id is None and llama.cfg.default_prepend_bos
    for rows in ([[0, 5, 0, 7, 0]], [[0, 0, 5, 0, 7]], [[0, 0, 5, 0, 7], [0, 5, 6, 0, 7]], [[0, 0, 0, 9, 8]]):
        ids = torch.tensor(rows)
        assert_close(llama(ids), llama(ids, attention_mask=torch.ones_like(ids)), atol=0, rtol=0)
        assert_close(llama.generate(ids, max_new_tokens=3, use_cache=True),
                     llama.generate(ids, max_new_tokens=3, use_cache=True, attention_mask=torch.ones_like(ids)))
    # a genuinely left-padded batch: to_tokens pads "a" with two 0s before its BOS 0
    texts = ["a", "abc"]
    padded = llama.to_tokens(texts, padding_side="left")
    assert padded[0].tolist()[:3] == [0, 0, 0]
    reference = llama(texts, padding_side="left")
    assert_close(llama(padded, padding_side="left"), reference)
    assert_close(llama(padded.clone(), padding_side="left"), reference)  # told by the call
    if tokenizer_side == "left":  # TransformerLens's switch: the mask is inferred for the ids to_tokens padded
        assert_close(llama(padded), reference)
    else:
        with pytest.raises(ValueError, match=r"row\(s\) start with the pad token"):
            llama(padded)
    assert_close(llama(padded.clone())[1], reference[1])  # a copy is plain ids: row 1 (unpadded) is unchanged
