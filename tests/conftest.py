"""Shared fixtures: tiny random transformers checkpoints saved to disk, and the bundled real model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never reach a hub, and the GGUF conversion cache lives in a per-run folder unless the caller set one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def save_hf(model, tmp_path: Path, name: str = "ckpt", **kw) -> Path:
    """Save a transformers model (random weights) and return the folder."""
    folder = tmp_path / name
    model.save_pretrained(folder, **kw)
    return folder


def randomize_norms(model) -> None:
    """transformers initialises norm weights to constants; random ones make parity tests see the norm weights."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


def byte_tokenizer():
    """A 256-symbol byte-level tokenizer, so tiny random models (vocab >= 256) can read real text."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """Run `residscope argv` in this process the way the console script does (one-line errors, exit codes):
    (exit code, stdout, stderr)."""
    from residscope.apps.cli import app
    from residscope.apps.errors import run_cli as run

    try:
        run(app, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if e.code is not None else 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="session")
def real_model():
    """The bundled SmolLM2-135M (float32); skipped where it is not installed."""
    from residscope.model import load_model

    try:
        return load_model("smollm2-135m")
    except (FileNotFoundError, ImportError, ValueError) as e:
        pytest.skip(f"bundled model unavailable: {e}")


@pytest.fixture
def hf_norms_in_float64(monkeypatch):
    """transformers' RMSNorms round through float32 even in a float64 model; residscope's float64 models normalise in
    float64 (so decompositions of them are exact to 1e-9). Float64 parity tests compare with a transformers whose norms
    do the same; in float32 and below these forwards compute exactly what transformers' own do."""
    from transformers.models.gemma3 import modeling_gemma3
    from transformers.models.llama import modeling_llama

    def rms(x, eps):
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        return wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)

    def llama(self, x):
        return self.weight * rms(x, self.variance_epsilon).to(x.dtype)

    def gemma(self, x):
        normed = rms(x, self.eps)
        return (normed * (1.0 + self.weight.to(normed.dtype))).type_as(x)

    def olmo(self, x):  # OLMo 2 / 3 multiply the weight before the cast
        return (self.weight * rms(x, self.variance_epsilon)).to(x.dtype)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", llama)
    monkeypatch.setattr(modeling_gemma3.Gemma3RMSNorm, "forward", gemma)
    # the RMSNorm families of tests/family_cases_rms.py
    from transformers.models.gemma import modeling_gemma
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.granite import modeling_granite
    from transformers.models.olmo2 import modeling_olmo2
    from transformers.models.olmo3 import modeling_olmo3
    from transformers.models.phi3 import modeling_phi3
    from transformers.models.qwen3 import modeling_qwen3
    from transformers.models.smollm3 import modeling_smollm3

    for norm in (modeling_qwen3.Qwen3RMSNorm, modeling_phi3.Phi3RMSNorm, modeling_granite.GraniteRMSNorm,
                 modeling_smollm3.SmolLM3RMSNorm):
        monkeypatch.setattr(norm, "forward", llama)
    for norm in (modeling_gemma.GemmaRMSNorm, modeling_gemma2.Gemma2RMSNorm):
        monkeypatch.setattr(norm, "forward", gemma)
    for norm in (modeling_olmo2.Olmo2RMSNorm, modeling_olmo3.Olmo3RMSNorm):
        monkeypatch.setattr(norm, "forward", olmo)

    # Gemma 2 runs transformers' eager attention (SDPA has no soft-cap), whose softmax rounds through float32 too
    eager = modeling_gemma2.eager_attention_forward

    def eager_wide_softmax(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
        if query.dtype != torch.float64:
            return eager(module, query, key, value, attention_mask, dropout, scaling, softcap, **kw)
        key, value = modeling_gemma2.repeat_kv(key, module.num_key_value_groups), modeling_gemma2.repeat_kv(value, module.num_key_value_groups)
        scores = torch.matmul(query, key.transpose(2, 3)) * (module.head_dim**-0.5 if scaling is None else scaling)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = torch.softmax(scores, dim=-1)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

    monkeypatch.setattr(modeling_gemma2, "eager_attention_forward", eager_wide_softmax)

    # `.double()` keeps the sqrt(d_model) buffer a float32 built (rounded); from_pretrained(dtype=float64) builds it
    # exact, as residscope computes it
    def scaled_embedding(self, ids):
        scale = self.scalar_embed_scale if self.weight.dtype == torch.float64 else self.embed_scale.to(self.weight.dtype)
        return torch.nn.Embedding.forward(self, ids) * scale

    for embedding in (modeling_gemma.GemmaTextScaledWordEmbedding, modeling_gemma2.Gemma2TextScaledWordEmbedding):
        monkeypatch.setattr(embedding, "forward", scaled_embedding)
    # mixture-of-experts families (family_cases_moe.py): their RMSNorms, and routers whose softmax is float32 in
    # transformers even for float64 models (residscope's runs in float64 there)
    import importlib

    def router(self, x):
        logits = torch.nn.functional.linear(x.reshape(-1, self.hidden_dim), self.weight, getattr(self, "bias", None))
        probs = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        top, idx = probs.topk(self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):
            top = top / top.sum(-1, keepdim=True)
        return logits, top.to(logits.dtype), idx

    for family, prefix in (("qwen2_moe", "Qwen2Moe"), ("qwen3_moe", "Qwen3Moe"), ("mixtral", "Mixtral"),
                           ("olmoe", "Olmoe")):
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        monkeypatch.setattr(getattr(module, f"{prefix}RMSNorm"), "forward", llama)
        monkeypatch.setattr(getattr(module, f"{prefix}TopKRouter"), "forward", router)
    # gpt-oss: its norm multiplies the weight before the cast, as OLMo 2's; its router's softmax already runs in the
    # logits' dtype, float64 for float64 models
    from transformers.models.gpt_oss import modeling_gpt_oss

    monkeypatch.setattr(modeling_gpt_oss.GptOssRMSNorm, "forward", olmo)
    _hf_attention_in_float64(monkeypatch)


def _hf_attention_in_float64(monkeypatch):
    """BLOOM's attention softmax (dtype=float32) and GPT-Neo's q·k (q.to(float32)) round a float64 model through float32,
    where residscope computes in at least float32 (float64 for float64 models); patched the same way as the norms."""
    import types

    import torch.nn.functional as F
    from transformers.models.bloom import modeling_bloom
    from transformers.models.gpt_neo import modeling_gpt_neo

    def softmax(x, dim=None, dtype=None, **kw):
        return F.softmax(x, dim=dim, dtype=None if dtype is None else torch.promote_types(x.dtype, dtype), **kw)

    monkeypatch.setattr(modeling_bloom, "F", types.SimpleNamespace(**{**vars(F), "softmax": softmax}))
    original_attn = modeling_gpt_neo.GPTNeoSelfAttention._attn

    def neo_attn(self, query, key, value, attention_mask=None):
        if query.dtype != torch.float64:
            return original_attn(self, query, key, value, attention_mask)
        scores = torch.matmul(query, key.transpose(-1, -2))  # [batch, head, q, k], float64 throughout
        q_len, k_len = query.size(-2), key.size(-2)
        causal = self.bias[:, :, k_len - q_len: k_len, :k_len]
        scores = torch.where(causal, scores, torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype))
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = torch.softmax(scores, dim=-1)
        return torch.matmul(weights, value), weights

    monkeypatch.setattr(modeling_gpt_neo.GPTNeoSelfAttention, "_attn", neo_attn)
