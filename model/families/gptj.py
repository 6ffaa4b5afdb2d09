"""GPT-J: one LayerNorm per block feeding attention and MLP in parallel (x + attn(ln_1(x)) + mlp(ln_1(x))), rotary on
the first `rotary_dim` dimensions of each head in the interleaved layout (rotate_every_two: 2i pairs with 2i + 1),
q·k and softmax in float32, no attention biases, a plain gelu_new MLP, and an lm_head with a bias."""

from __future__ import annotations

from ..errors import ConfigError
from ..hf_config import FULL, activation, positive_int, rope_params
from .base import Family, WeightMap
from .gpt2 import ALIASES, KEYS


def read_config(cfg: dict, common: dict, source: str) -> dict:
    d_head = common["d_head"]
    rotary_dim = positive_int(cfg, "rotary_dim", source, None) if "rotary_dim" in cfg else 64  # GPTJConfig's default
    rotary_dim = rotary_dim or d_head  # rotary_dim None: the whole head
    if rotary_dim > d_head or rotary_dim % 2:
        raise ConfigError(f"{source}: rotary_dim must be an even number <= the head size {d_head}, got {rotary_dim}")
    # GPT-J's sinusoids: theta 10000, no scaling (the config has no RoPE keys)
    rope = rope_params({}, source, common["max_position_embeddings"], partial=rotary_dim / d_head, interleaved=True)
    return dict(common, act=activation(cfg, source, "activation_function", "gelu_new"), mlp="plain", norm="layer",
                qkv_bias=False, o_bias=False, mlp_bias=True, parallel=True, shared_norm=True, unembed_bias=True,
                attn_fp32=True, positional="rope", rope={FULL: rope})


def weights(cfg) -> WeightMap:
    return WeightMap(
        layer_prefix="transformer.h.{i}.",
        base_prefix="transformer.",
        top={"transformer.wte.weight": "embed.weight", "transformer.ln_f.weight": "ln_final.weight",
             "transformer.ln_f.bias": "ln_final.bias", "lm_head.weight": "unembed.weight", "lm_head.bias": "unembed.bias"},
        block={
            "ln_1.weight": "ln1.weight", "ln_1.bias": "ln1.bias",
            **{f"attn.{n}_proj.weight": f"attn.{n}_proj.weight" for n in ("q", "k", "v")},
            "attn.out_proj.weight": "attn.o_proj.weight",
            "mlp.fc_in.weight": "mlp.up_proj.weight", "mlp.fc_in.bias": "mlp.up_proj.bias",
            "mlp.fc_out.weight": "mlp.down_proj.weight", "mlp.fc_out.bias": "mlp.down_proj.bias",
        },
        ignored=(r"\.attn\.bias$", r"\.attn\.masked_bias$", r"\.attn\.rotary_emb\.", r"embed_positions$"),
    )


FAMILY = Family(model_type="gptj", architecture="GPTJForCausalLM", read_config=read_config, weights=weights,
                keys=KEYS, aliases=ALIASES, gguf_arch="gptj")
