"""OLMo 2: no norms on the halves' inputs, an RMSNorm on each half's output before the residual add (post_norms only),
q and k RMS-normalised over the whole projection (all heads at once) before RoPE, and two roundings of its own: the
norm weight multiplies in float32 before the cast to the model dtype, and RoPE rotates with float32 cos/sin."""

from __future__ import annotations

from ..hf_config import FULL, positive_float, rope_params
from .base import Family
from .llama import llama_weights

POST_NORMS = {"post_attention_layernorm.weight": "ln1_post.weight", "post_feedforward_layernorm.weight": "ln2_post.weight"}


def olmo_fields(cfg: dict, common: dict, source: str) -> dict:
    """What OLMo 2 and OLMo 3 share."""
    bias = bool(cfg.get("attention_bias", False))
    return dict(common, norm_eps=positive_float(cfg, "rms_norm_eps", source, 1e-5), qkv_bias=bias, o_bias=bias,
                pre_norms=False, post_norms=True, qk_norm="full", norm_wide_gain=True, rope_wide=True)


def read_config(cfg: dict, common: dict, source: str) -> dict:
    return dict(olmo_fields(cfg, common, source), rope={FULL: rope_params(cfg, source, common["max_position_embeddings"])})


def weights(cfg):
    # Llama's input_layernorm / post_attention_layernorm names are replaced: the latter is the attention OUTPUT's norm
    wmap = llama_weights(cfg, block=POST_NORMS)
    block = {k: v for k, v in wmap.block.items() if k != "input_layernorm.weight"}
    return type(wmap)(layer_prefix=wmap.layer_prefix, top=wmap.top, block=block, ignored=wmap.ignored)


FAMILY = Family(model_type="olmo2", architecture="Olmo2ForCausalLM", read_config=read_config, weights=weights,
                gguf_arch="olmo2")
