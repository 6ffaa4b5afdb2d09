"""TransformerLens' weight names on residscope's modules: W_Q, W_O, W_in, ... as views of the nn.Linear weights.

TransformerLens stores per-head matrices (`W_Q [head, d_model, d_head]`); residscope keeps transformers' nn.Linear layout
(`q_proj.weight [head * d_head, d_model]`) so checkpoints load and export unchanged. The properties here reshape without
copying, so `model.blocks[3].attn.W_O[5] *= 0` ablates head 5 of layer 3. Not views (TransformerLens returns copies too):
- `W_K`/`W_V`/`b_K`/`b_V` on GQA models: the KV heads repeated to `n_heads` (TransformerLens' `repeat_interleave`);
  `_W_K`/`_W_V`/`_b_K`/`_b_V` are the views of the KV heads themselves.
- biases the model does not have: zeros of the right shape.
- the decoder-level stacks `model.W_Q [layer, head, d_model, d_head]`: `torch.stack` of the per-block views, as in
  TransformerLens; a layer whose attention or MLP was removed by surgery stacks zeros (it adds nothing to the residual
  stream, which is what zero weights say), so index i is still block i.
- `model.W_U` of a NormHead model (Baichuan 2): the row-normalised matrix the logits are computed with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens import FactoredMatrix


def _bias_or_zeros(linear: nn.Linear, *shape: int) -> torch.Tensor:
    """The bias viewed as `shape`, or zeros when the layer has none (TransformerLens always has a bias tensor)."""
    if linear.bias is not None:
        return linear.bias.view(*shape)
    return torch.zeros(*shape, dtype=linear.weight.dtype, device=linear.weight.device)


class AttentionWeights:
    """Mixed into `Attention` (needs q_proj/k_proj/v_proj/o_proj, n_heads, n_kv_heads, n_rep, d_head)."""

    def _heads_in(self, linear: nn.Linear, n: int) -> torch.Tensor:
        """weight [n * d_head, d_model] -> view [n, d_model, d_head]."""
        return linear.weight.view(n, self.d_head, -1).transpose(-1, -2)

    def _repeat_kv(self, w: torch.Tensor) -> torch.Tensor:
        """KV heads -> query heads on dim 0: query head h reads KV head h // n_rep (a copy unless n_rep == 1)."""
        return w if self.n_rep == 1 else w.repeat_interleave(self.n_rep, dim=0)

    @property
    def W_Q(self) -> torch.Tensor:  # [head, d_model, d_head]
        return self._heads_in(self.q_proj, self.n_heads)

    @property
    def _W_K(self) -> torch.Tensor:  # [kv_head, d_model, d_head]
        return self._heads_in(self.k_proj, self.n_kv_heads)

    @property
    def _W_V(self) -> torch.Tensor:  # [kv_head, d_model, d_head]
        return self._heads_in(self.v_proj, self.n_kv_heads)

    @property
    def W_K(self) -> torch.Tensor:  # [head, d_model, d_head]
        return self._repeat_kv(self._W_K)

    @property
    def W_V(self) -> torch.Tensor:  # [head, d_model, d_head]
        return self._repeat_kv(self._W_V)

    @property
    def W_O(self) -> torch.Tensor:  # [head, d_head, d_model]
        return self.o_proj.weight.view(-1, self.n_heads, self.d_head).permute(1, 2, 0)

    @property
    def b_Q(self) -> torch.Tensor:  # [head, d_head]
        return _bias_or_zeros(self.q_proj, self.n_heads, self.d_head)

    @property
    def _b_K(self) -> torch.Tensor:  # [kv_head, d_head]
        return _bias_or_zeros(self.k_proj, self.n_kv_heads, self.d_head)

    @property
    def _b_V(self) -> torch.Tensor:  # [kv_head, d_head]
        return _bias_or_zeros(self.v_proj, self.n_kv_heads, self.d_head)

    @property
    def b_K(self) -> torch.Tensor:  # [head, d_head]
        return self._repeat_kv(self._b_K)

    @property
    def b_V(self) -> torch.Tensor:  # [head, d_head]
        return self._repeat_kv(self._b_V)

    @property
    def b_O(self) -> torch.Tensor:  # [d_model]
        return _bias_or_zeros(self.o_proj, self.o_proj.out_features)

    @property
    def QK(self) -> FactoredMatrix:  # [head, d_model, d_model]; before RoPE, ALiBi and (Gemma 3) q/k norms
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-1, -2))

    @property
    def OV(self) -> FactoredMatrix:  # [head, d_model, d_model]
        return FactoredMatrix(self.W_V, self.W_O)


class MLPWeights:
    """Mixed into `MLP`. TransformerLens' gated naming: W_gate feeds the activation (hook_pre), W_in the linear branch
    (hook_pre_linear). b_in is up_proj's own bias (TransformerLens adds its b_in after the product; our models have
    none or a real up_proj bias)."""

    @property
    def W_in(self) -> torch.Tensor:  # [d_model, d_mlp]
        return self.up_proj.weight.T

    @property
    def W_gate(self) -> torch.Tensor | None:  # [d_model, d_mlp]; None for a plain MLP (GPT-2 & co.), as in TransformerLens
        return self.gate_proj.weight.T if self.gated else None

    @property
    def W_out(self) -> torch.Tensor:  # [d_mlp, d_model]
        return self.down_proj.weight.T

    @property
    def b_in(self) -> torch.Tensor:  # [d_mlp]
        return _bias_or_zeros(self.up_proj, self.up_proj.out_features)

    @property
    def b_gate(self) -> torch.Tensor | None:  # [d_mlp]; None for a plain MLP
        return _bias_or_zeros(self.gate_proj, self.gate_proj.out_features) if self.gated else None

    @property
    def b_out(self) -> torch.Tensor:  # [d_model]
        return _bias_or_zeros(self.down_proj, self.down_proj.out_features)


class Embed(nn.Embedding):
    """The token embedding; `W_E` [d_vocab, d_model] is its weight, as on TransformerLens' Embed."""

    @property
    def W_E(self) -> torch.Tensor:  # [d_vocab, d_model]
        return self.weight


class PosEmbed(nn.Embedding):
    """Learned absolute positions (GPT-2, OPT): position p reads row p + offset (OPT keeps 2 unused rows in front).
    `W_pos` [n_ctx, d_model] is TransformerLens' name for the rows positions read (a view)."""

    def __init__(self, n_rows: int, d_model: int, offset: int = 0):
        super().__init__(n_rows, d_model)
        self.offset = offset

    @property
    def W_pos(self) -> torch.Tensor:  # [n_ctx, d_model]
        return self.weight[self.offset:]

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [batch, pos] -> [batch, pos, d_model]."""
        if positions.numel() and not positions.is_meta and int(positions.max()) + self.offset >= self.num_embeddings:
            from .errors import InputError

            raise InputError(f"position {int(positions.max())} is past this model's {self.num_embeddings - self.offset} "
                             "learned positions (max_position_embeddings)")
        return super().forward(positions + self.offset)


class Unembed(nn.Module):
    """logits = ln_final(x) @ W_U (+ b_U), with Baichuan 2's NormHead (unit rows), OPT-350m's projection out of the
    stream (`proj`), GPT-J's lm_head bias, Granite's logit divisor and final soft-capping, when configured.

    Holds the lm_head matrix as `weight` [d_vocab, d_embedding] (the checkpoint layout); `W_U` [d_model, d_vocab] is what
    the logits are computed with: a view of `weight`, or (NormHead, projection, divisor) the exact product (edit
    `weight`).
    """

    def __init__(self, d_embedding: int, d_vocab: int, *, norm_head: bool = False, softcap: float | None = None,
                 bias: bool = False, divisor: float | None = None, d_model: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_vocab, d_embedding))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation, for models built untrained
        self.bias = nn.Parameter(torch.zeros(d_vocab)) if bias else None
        self.proj = nn.Linear(d_model, d_embedding, bias=False) if d_model is not None else None
        self.norm_head, self.softcap, self.divisor = norm_head, softcap, divisor

    def _matrix(self) -> torch.Tensor:  # [d_vocab, d_embedding]
        return F.normalize(self.weight, dim=-1) if self.norm_head else self.weight

    @property
    def W_U(self) -> torch.Tensor:  # [d_model, d_vocab]
        w = self._matrix().T  # [d_embedding, d_vocab]
        if self.proj is not None:
            w = self.proj.weight.T @ w  # [d_model, d_vocab]
        return w if self.divisor is None else w / self.divisor

    @property
    def b_U(self) -> torch.Tensor:  # [d_vocab]
        if self.bias is None:
            return torch.zeros(self.weight.shape[0], dtype=self.weight.dtype, device=self.weight.device)
        return self.bias if self.divisor is None else self.bias / self.divisor

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        """[batch, pos, d_model] (after ln_final) -> logits [batch, pos, d_vocab]."""
        if self.proj is not None:
            normed = self.proj(normed)  # [batch, pos, d_embedding]
        logits = F.linear(normed, self._matrix(), self.bias)
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class DecoderWeights:
    """Mixed into `Decoder`: TransformerLens' model-level weights, stacked over layers, and `accumulated_bias`."""

    def _stack(self, sub: str, name: str) -> torch.Tensor:
        """torch.stack of `blocks[i].<sub>.<name>`; zeros for a block whose <sub> was removed."""
        present = [getattr(getattr(b, sub), name) for b in self.blocks if getattr(b, sub) is not None]
        if not present:
            raise ValueError(f"no block has {'attention' if sub == 'attn' else 'an MLP'} left: {name} is undefined")
        zeros = torch.zeros_like(present[0])
        return torch.stack([getattr(getattr(b, sub), name) if getattr(b, sub) is not None else zeros for b in self.blocks])

    W_Q = property(lambda self: self._stack("attn", "W_Q"), doc="[layer, head, d_model, d_head]")
    W_K = property(lambda self: self._stack("attn", "W_K"), doc="[layer, head, d_model, d_head] (KV heads repeated)")
    W_V = property(lambda self: self._stack("attn", "W_V"), doc="[layer, head, d_model, d_head] (KV heads repeated)")
    W_O = property(lambda self: self._stack("attn", "W_O"), doc="[layer, head, d_head, d_model]")
    b_Q = property(lambda self: self._stack("attn", "b_Q"), doc="[layer, head, d_head]")
    b_K = property(lambda self: self._stack("attn", "b_K"), doc="[layer, head, d_head]")
    b_V = property(lambda self: self._stack("attn", "b_V"), doc="[layer, head, d_head]")
    b_O = property(lambda self: self._stack("attn", "b_O"), doc="[layer, d_model]")
    W_in = property(lambda self: self._stack("mlp", "W_in"), doc="[layer, d_model, d_mlp]")
    W_gate = property(lambda self: self._stack("mlp", "W_gate") if self.cfg.gated_mlp else None,
                      doc="[layer, d_model, d_mlp]; None for plain MLPs (TransformerLens's TransformerBridge.W_gate)")
    W_out = property(lambda self: self._stack("mlp", "W_out"), doc="[layer, d_mlp, d_model]")
    b_in = property(lambda self: self._stack("mlp", "b_in"), doc="[layer, d_mlp]")
    b_out = property(lambda self: self._stack("mlp", "b_out"), doc="[layer, d_model]")

    def tl_parameters(self) -> dict[str, torch.Tensor]:
        """TransformerLens's parameter dictionary ("blocks.0.attn.W_Q" [head, d_model, d_head], "blocks.0.ln1.w", "unembed.W_U",
        ...): TransformerBridge.tl_parameters, built by TransformerLens's own `get_bridge_params` from the W_* views
        here, so SVDInterpreter and other consumers of that format read it. KV heads are repeated to n_heads; absent
        biases are zeros; `pos_embed.W_pos` only where positions are learned (ALiBi / no positions: zeros, as there)."""
        from transformer_lens.model_bridge.get_params_util import get_bridge_params

        return get_bridge_params(self)

    def tl_named_parameters(self):
        """Iterator of (TransformerLens name, tensor) pairs: `tl_parameters().items()`."""
        return iter(self.tl_parameters().items())

    @property
    def W_E(self) -> torch.Tensor:  # [d_vocab, d_model]; Gemma multiplies the looked-up rows by cfg.embed_scale
        """The embedding matrix; for OPT-350m's narrow embeddings the exact product with project_in (what each token
        writes into the stream, like W_U with project_out; edit `embed.weight` itself)."""
        if "embed_proj" in self._modules:
            return self.embed.weight @ self.embed_proj.weight.T  # [d_vocab, d_embed] @ [d_embed, d_model]
        return self.embed.weight

    @property
    def W_pos(self) -> torch.Tensor:  # [n_ctx, d_model]; learned positions only (GPT-2, OPT)
        if "pos_embed" not in self._modules:
            raise AttributeError(f"W_pos: this model's positions are {self.cfg.positional!r}, not learned")
        return self.pos_embed.W_pos

    @property
    def W_U(self) -> torch.Tensor:  # [d_model, d_vocab]
        return self.unembed.W_U

    @property
    def b_U(self) -> torch.Tensor:  # [d_vocab]
        return self.unembed.b_U

    @property
    def QK(self) -> FactoredMatrix:  # [layer, head, d_model, d_model]
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-1, -2))

    @property
    def OV(self) -> FactoredMatrix:  # [layer, head, d_model, d_model]
        return FactoredMatrix(self.W_V, self.W_O)

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """Sum of the attention output biases (and MLP output biases) written to the residual stream before `layer`
        [d_model] (times the residual multiplier where there is one: Granite); with `mlp_input`, also layer `layer`'s
        attention bias (the input to its MLP)."""
        n = len(self.blocks)
        if not 0 <= layer <= n or (mlp_input and layer == n):
            raise ValueError(f"layer must be in [0, {n}{')' if mlp_input else ']'} (mlp_input={mlp_input}), got {layer}")
        total = torch.zeros(self.cfg.d_model, dtype=self.dtype, device=self.device)  # [d_model]
        for i, block in enumerate(self.blocks[: layer + mlp_input]):
            halves = [block.attn] + ([block.mlp] if include_mlp_biases and i < layer else [])
            for half in halves:
                if half is None:
                    continue
                bias = half.o_proj.bias if half is block.attn else half.down_proj.bias
                if bias is not None and block.post_norms:
                    raise ValueError(f"blocks.{i}: the output bias passes through a post-norm (per-position scale), "
                                     "so it is not a constant residual-stream term")
                if bias is not None:  # Granite's residual multiplier scales what the bias writes, too
                    total = total + (bias if block.residual_scale is None else bias * block.residual_scale)
        return total

    def unembed_directions(self, tokens: torch.Tensor | int | list[int]) -> torch.Tensor:
        """[..., d_model] for token ids [...]: the residual-stream direction whose dot product with a stack divided by
        ln_final's scale (ActivationCache.apply_ln_to_stack) is the token's logit. residscope does not fold norms into
        W_U, so this is W_U's column times ln_final's gain (for NormHead, of the normalised matrix)."""
        if self.unembed.softcap is not None:
            raise ValueError(f"final logit soft-capping (tanh, cap {self.unembed.softcap}) is not linear: logit "
                             "attributions would not sum to the logits")
        ids = torch.as_tensor(tokens, device=self.device)
        return self.W_U[:, ids].movedim(0, -1) * self.ln_final.gain  # [..., d_model]
