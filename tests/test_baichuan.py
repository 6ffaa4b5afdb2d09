"""Baichuan 2 parity against a small independent reference written from the published formulas.

transformers has no Baichuan class and residscope never runs remote code, so the reference lives here and uses no
residscope code: fused W_pack rows [q; k; v], RMSNorm, SwiGLU, RoPE in the rotate_half layout (7B) or ALiBi (13B) with
Baichuan's published bias slope_h * j and slope rule for any head count, NormHead (every lm_head row L2-normalised)
and a causal mask. Checkpoints are random folders with Baichuan's own config keys and tensor names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from residscope.model.checkpoint import local_to_hf
from residscope.model.config import ConfigError
from residscope.model.errors import CheckpointError
from residscope.model.loading import load_model

VOCAB, D_HEAD, D_MLP, LAYERS, SEQ = 128, 8, 80, 3, 20


# ---------------------------------------------------------------------------------------------------------------------
# the independent reference
# ---------------------------------------------------------------------------------------------------------------------
def ref_alibi_slopes(n: int) -> list[float]:
    """slope_h = 2^(-8(h+1)/n) for a power of two n; else the c = 2^floor(log2 n) slopes, then every other slope of
    the 2c sequence for the remaining n - c heads."""

    def power_of_two(m: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / m) for h in range(m)]

    c = 2 ** math.floor(math.log2(n))
    if c == n:
        return power_of_two(n)
    return power_of_two(c) + power_of_two(2 * c)[0::2][: n - c]


def ref_rms_norm(x, w, eps):
    """RESEARCH.md's RMSNorm, w * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(dtype): normalised in float32, or
    in float64 for a float64 run (transformers' Llama would round through float32; residscope does not)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def ref_rotate(x, base=10000.0):
    """RoPE on x [batch, head, pos, d_head], rotate_half layout; angles in float32 like Baichuan's RotaryEmbedding."""
    d, t = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
    angles = torch.outer(torch.arange(t).float(), inv_freq)  # [pos, d/2]
    cos, sin = torch.cat((angles, angles), -1).cos().to(x.dtype), torch.cat((angles, angles), -1).sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat((-x2, x1), -1) * sin


def ref_forward(sd: dict, hp: dict, ids: torch.Tensor, positional: str, dtype=torch.float32) -> torch.Tensor:
    sd = {k: v.to(dtype) for k, v in sd.items()}
    n, d_model, eps = hp["num_attention_heads"], hp["hidden_size"], hp["rms_norm_eps"]
    d = d_model // n
    b, t = ids.shape
    x = sd["model.embed_tokens.weight"][ids]
    j = torch.arange(t)
    causal = j[None, :] <= j[:, None]  # [q, k]
    for i in range(hp["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = ref_rms_norm(x, sd[p + "input_layernorm.weight"], eps)
        qkv = h @ sd[p + "self_attn.W_pack.weight"].T  # [b, t, 3 * d_model]: [q; k; v]
        q, k, v = (z.reshape(b, t, n, d).transpose(1, 2) for z in qkv.split(d_model, dim=-1))
        if positional == "rope":
            q, k = ref_rotate(q), ref_rotate(k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # [b, head, q, k]
        if positional == "alibi":  # Baichuan 13B's eval code: slope_h * j (identical to slope_h * (j - i) after softmax)
            scores = scores + torch.tensor(ref_alibi_slopes(n), dtype=dtype)[:, None, None] * j.to(dtype)
        scores = scores.masked_fill(~causal, float("-inf"))
        z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d_model)
        x = x + z @ sd[p + "self_attn.o_proj.weight"].T
        h = ref_rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    x = ref_rms_norm(x, sd["model.norm.weight"], eps)
    head = sd["lm_head.weight"]
    return x @ (head / head.norm(dim=-1, keepdim=True)).T  # NormHead


# ---------------------------------------------------------------------------------------------------------------------
# random checkpoint folders
# ---------------------------------------------------------------------------------------------------------------------
REMOTE_FILES = ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py")


def hf_config(style: str, n_heads: int) -> dict:
    cfg = {
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
        },
        "model_type": "baichuan",
        "hidden_size": n_heads * D_HEAD,
        "intermediate_size": D_MLP,
        "num_attention_heads": n_heads,
        "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "model_max_length": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "use_cache": True,
        "z_loss_weight": 0,
        "torch_dtype": "bfloat16",
    }
    if style == "7b":  # 7B: RoPE, and the config carries max_position_embeddings; 13B (ALiBi) has only model_max_length
        cfg["max_position_embeddings"] = 4096
    return cfg


def random_state(hp: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    H, F = hp["hidden_size"], hp["intermediate_size"]

    def lin(rows, cols):
        return torch.randn(rows, cols, generator=g) * (1.5 / cols**0.5)

    def norm(dim):
        return 1.0 + 0.3 * torch.randn(dim, generator=g)

    sd = {"model.embed_tokens.weight": torch.randn(VOCAB, H, generator=g), "model.norm.weight": norm(H)}
    # lm_head rows with very different norms: NormHead must remove them
    sd["lm_head.weight"] = torch.randn(VOCAB, H, generator=g) * torch.exp(torch.randn(VOCAB, 1, generator=g))
    for i in range(hp["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(H)
        sd[p + "post_attention_layernorm.weight"] = norm(H)
        sd[p + "self_attn.W_pack.weight"] = lin(3 * H, H) * 2  # sharper attention
        sd[p + "self_attn.o_proj.weight"] = lin(H, H)
        sd[p + "mlp.gate_proj.weight"] = lin(F, H)
        sd[p + "mlp.up_proj.weight"] = lin(F, H)
        sd[p + "mlp.down_proj.weight"] = lin(H, F)
    return sd


def write_checkpoint(folder: Path, style: str, n_heads: int, seed: int = 0) -> tuple[dict, dict]:
    hp = hf_config(style, n_heads)
    sd = random_state(hp, seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hp))
    save_file(sd, str(folder / "model.safetensors"))
    # Baichuan ships remote code next to its weights; if anything imported it, it would leave a trace
    for name in REMOTE_FILES:
        (folder / name).write_text(
            "import pathlib\npathlib.Path(__file__).with_name('REMOTE_CODE_RAN').write_text(__name__)\n"
            "raise RuntimeError('remote code must never run')\n"
        )
    return hp, sd


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("baichuan")
    return {(style, n): (root / f"{style}_{n}", *write_checkpoint(root / f"{style}_{n}", style, n, seed=n))
            for style, n in (("7b", 8), ("13b", 8), ("13b", 12), ("13b", 6))}


def _ids(batch=2, seq=SEQ, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _hook_all_patterns(model):
    return [(f"blocks.{i}.attn.hook_pattern", lambda t, hook: t) for i in range(model.cfg.n_layers)]


# ---------------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------------
def test_alibi_slopes_published_values():
    from residscope.model.decoder import alibi_slopes

    eight = [2.0**-k for k in range(1, 9)]  # 1/2, 1/4, ..., 1/256
    torch.testing.assert_close(alibi_slopes(8), torch.tensor(eight), atol=0, rtol=1e-7)
    # 12 heads: the 8 power-of-two slopes, then every other slope of the 16 sequence 2^-0.5, 2^-1, ..., 2^-8
    twelve = eight + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(twelve), atol=0, rtol=1e-7)
    # 6 heads: the 4 slopes 2^-2, 2^-4, 2^-6, 2^-8, then 2^-1, 2^-3 from the 8 sequence
    six = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(six), atol=0, rtol=1e-7)
    assert ref_alibi_slopes(12) == pytest.approx(twelve, rel=1e-15) and ref_alibi_slopes(6) == pytest.approx(six, rel=1e-15)
    for n in range(1, 41):
        torch.testing.assert_close(alibi_slopes(n), torch.tensor(ref_alibi_slopes(n)), atol=0, rtol=1e-6)


def test_config_choice_of_position_embedding(checkpoints):
    folder7 = checkpoints[("7b", 8)][0]
    folder13 = checkpoints[("13b", 8)][0]
    m7, m13 = load_model(folder7, load_tokenizer=False), load_model(folder13, load_tokenizer=False)
    assert m7.cfg.positional == "rope" and m13.cfg.positional == "alibi"
    assert m7.cfg.norm_head and m13.cfg.norm_head and not m7.cfg.tie_embeddings
    assert m7.cfg.rope_of(0).theta == 10000.0 and m13.cfg.rope_of(0) is None
    assert m13.cfg.max_position_embeddings == 4096  # taken from model_max_length
    assert m13.blocks[0].attn.positional == "alibi" and m7.blocks[0].attn.positional == "rope"
    with pytest.raises(ConfigError, match="position_embedding"):
        load_model(folder7, position_embedding="nope", load_tokenizer=False)


CASES = [
    # (style, heads, position_embedding override, expected positional)
    ("7b", 8, None, "rope"),
    ("13b", 8, None, "alibi"),  # power of two
    ("13b", 12, None, "alibi"),  # not a power of two
    ("13b", 6, None, "alibi"),  # not a power of two
    ("7b", 8, "alibi", "alibi"),  # explicit override of a 7B-style config
    ("13b", 12, "rope", "rope"),  # explicit override of a 13B-style config
]


@pytest.mark.parametrize("style,heads,override,positional", CASES, ids=[f"{s}-{h}h-{o or 'auto'}" for s, h, o, _ in CASES])
def test_logits_match_reference(checkpoints, style, heads, override, positional):
    folder, hp, sd = checkpoints[(style, heads)]
    ids = _ids()
    model = load_model(folder, position_embedding=override, load_tokenizer=False)
    assert model.cfg.positional == positional
    with torch.no_grad():
        ours = model(ids)
        explicit = model.run_with_hooks(ids, fwd_hooks=_hook_all_patterns(model))
    ref = ref_forward(sd, hp, ids, positional)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, ref, atol=1e-5, rtol=1e-5)
    # float64: only formula differences would survive (RoPE angles are float32 on both sides)
    model64 = load_model(folder, dtype=torch.float64, position_embedding=override, load_tokenizer=False)
    with torch.no_grad():
        torch.testing.assert_close(model64(ids), ref_forward(sd, hp, ids, positional, torch.float64), atol=1e-10, rtol=1e-10)
    # the model must really depend on positions, or the comparison above would not test them
    with torch.no_grad():
        assert (model(ids.flip(1)).flip(1) - ours).abs().max() > 1e-2


def test_norm_head_ignores_row_scale(checkpoints, tmp_path):
    """NormHead: scaling lm_head rows by positive factors changes nothing."""
    folder, hp, sd = checkpoints[("13b", 12)]
    scaled = dict(sd, **{"lm_head.weight": sd["lm_head.weight"] * torch.linspace(0.01, 100, VOCAB)[:, None]})
    (tmp_path / "config.json").write_text(json.dumps(hp))
    save_file(scaled, str(tmp_path / "model.safetensors"))
    ids = _ids()
    with torch.no_grad():
        a = load_model(folder, load_tokenizer=False)(ids)
        b = load_model(tmp_path, load_tokenizer=False)(ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_alibi_padded_rows_equal_unpadded(checkpoints, side):
    folder, hp, sd = checkpoints[("13b", 12)]
    model = load_model(folder, load_tokenizer=False)
    short, long = _ids(1, SEQ - 6, seed=2), _ids(1, SEQ, seed=3)
    pad, ones = torch.zeros(1, 6, dtype=torch.long), torch.ones(1, SEQ - 6, dtype=torch.long)
    ids = torch.cat((torch.cat((pad, short) if side == "left" else (short, pad), 1), long))
    mask = torch.cat((torch.cat((pad, ones) if side == "left" else (ones, pad), 1), torch.ones_like(long)))
    real = slice(6, None) if side == "left" else slice(0, SEQ - 6)
    with torch.no_grad():
        for batched in (model(ids, attention_mask=mask), model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=_hook_all_patterns(model))):
            torch.testing.assert_close(batched[0, real], ref_forward(sd, hp, short, "alibi")[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched[1], ref_forward(sd, hp, long, "alibi")[0], atol=1e-5, rtol=1e-5)


def test_remote_code_is_never_run(checkpoints):
    """auto_map in config.json (and a tokenizer_config.json naming a remote tokenizer class) must be ignored."""
    folder, hp, sd = checkpoints[("13b", 6)]
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BaichuanTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
        "add_bos_token": False,
        "add_eos_token": False,
    }))
    try:
        # the tokenizer step refuses the remote class in one line naming the file; without it the model loads
        with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: the tokenizer cannot be loaded"):
            load_model(folder)
        model = load_model(folder, load_tokenizer=False)
    finally:
        (folder / "tokenizer_config.json").unlink()
    assert not (folder / "REMOTE_CODE_RAN").exists()
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), ref_forward(sd, hp, _ids(), "alibi"), atol=1e-5, rtol=1e-5)


def test_export_fuses_w_pack_back(checkpoints):
    folder, hp, sd = checkpoints[("7b", 8)]
    model = load_model(folder, load_tokenizer=False)
    exported = local_to_hf(model.state_dict(), model.cfg)
    assert set(exported) == set(sd)
    for key, tensor in sd.items():
        torch.testing.assert_close(exported[key], tensor, atol=0, rtol=0)
