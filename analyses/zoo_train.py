"""Train the zoo: small decoders that differ only in their positional scheme, for the context-extension experiments.

    python -m residscope.analyses.zoo_train --all --out model/zoo --force    # every model (about 8 minutes each)
    python -m residscope.analyses.zoo_train --name zoo-rope --out DIR --steps 3000 --threads 1

Every model sees the same data in the same order (seeded), uses the same byte-level BPE tokenizer and the same size;
only the positional scheme differs:
    nope            no position embedding (causal attention alone carries position)
    rope            RoPE, base 10000 (above the RoPE context bound of the 128-token window for d_head 32, ~1.2e3)
    rope-smallbase  RoPE, base 20 (far below that bound: the "superficial long context" case of Men et al.)
    alibi           ALiBi slopes
    window          NoPE with sliding-window attention (window 32), trained on 128-token sequences
The training window is 128 tokens, so 8x beyond it is still cheap on a CPU.

Data: the calibration split of the built-in corpus (random 127-token crops after a BOS token); a quarter of the rows are
replaced by a passkey document (RESEARCH.md section 5) that fits in the window, and another quarter by n random tokens
repeated once (8 <= n <= 63), the classic curriculum for induction heads. Reference text alone teaches a model this size
no retrieval, so passkey accuracy would be zero at every length and tell us nothing about extension; with passkeys but
no repeats (500 steps) none of the five models retrieved a key even inside its window. The repeats also keep the model
from memorising the 100k-token split: held-out perplexity is lower than with text alone at the same step count.
Passkey evaluation uses keys drawn from a different seed.

Default: 3000 steps of 8 x 128 tokens, about 8 minutes a model on one free core (0.15 s a step).

Output folder per model (written to a temp folder, then renamed): config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, special_tokens_map.json, residscope_zoo.json (command, steps, final loss, seed, time).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from residscope.common.atomic import atomic_dir, check_output_dir
from residscope.common.errors import InputError
from residscope.model.checkpoint import local_to_hf
from residscope.model.config import DecoderConfig
from residscope.model.decoder import Decoder
from residscope.model.registry import ZOO_NAMES

from .corpus import builtin_text
from .passkey import FILLER, INTRO, QUESTION, passkey_document

TRAIN_WINDOW = 128
SEED = 0
BOS = "<|endoftext|>"


@dataclass(frozen=True)
class ZooSpec:
    """One zoo model: the architecture shared by all, plus its positional scheme."""

    name: str
    positional: str  # "rope", "alibi" or "none"
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 384
    vocab_size: int = 2048
    window: int = TRAIN_WINDOW
    # mixture of experts (zoo-moe, a Qwen2-MoE): routed experts, top-k, expert width, shared expert width
    n_experts: int = 0
    experts_per_tok: int = 2
    d_expert: int = 64
    d_shared_expert: int = 128

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def hf_config(self, bos_id: int, eos_id: int) -> dict:
        """A transformers-style config.json (llama, or mistral for the sliding window) with residscope's positional key."""
        cfg = {
            "architectures": ["MistralForCausalLM" if self.sliding_window else "LlamaForCausalLM"],
            "model_type": "mistral" if self.sliding_window else "llama",
            "hidden_size": self.d_model,
            "intermediate_size": self.d_mlp,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_heads,
            "head_dim": self.d_head,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.window,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": True,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "rope_theta": self.rope_theta,
            "residscope_position_embedding": self.positional,
            "torch_dtype": "float32",
        }
        if self.sliding_window:
            cfg["sliding_window"] = self.sliding_window
        if self.n_experts:  # Qwen2-MoE: every MLP sparse, with a shared expert; weights not renormalised (as Qwen2-57B)
            del cfg["residscope_position_embedding"]
            cfg.update(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", num_experts=self.n_experts,
                       num_experts_per_tok=self.experts_per_tok, moe_intermediate_size=self.d_expert,
                       shared_expert_intermediate_size=self.d_shared_expert, norm_topk_prob=False,
                       decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True, use_sliding_window=False,
                       router_aux_loss_coef=AUX_LOSS)
        return cfg


SPECS = {
    "nope": ZooSpec("nope", "none"),
    "rope": ZooSpec("rope", "rope", rope_theta=10000.0),
    "rope-smallbase": ZooSpec("rope-smallbase", "rope", rope_theta=20.0),
    "alibi": ZooSpec("alibi", "alibi"),
    "window": ZooSpec("window", "none", sliding_window=32),
    # not in ZOO_NAMES (--all keeps training the positional set); registered as zoo-moe from its folder
    "moe": ZooSpec("moe", "rope", n_experts=8),
}
AUX_LOSS = 0.01  # Switch-style load-balancing loss coefficient for zoo-moe


@dataclass
class TrainSettings:
    steps: int = 3000
    batch_size: int = 8
    lr: float = 3e-3
    warmup: int = 60
    weight_decay: float = 0.05
    passkey_fraction: float = 0.25
    repeat_fraction: float = 0.25
    seed: int = SEED


def spec_for(name: str) -> ZooSpec:
    key = name.removeprefix("zoo-")
    if key not in SPECS:
        raise ValueError(f"--name: unknown zoo model {name!r} (choose from {', '.join('zoo-' + n for n in SPECS)})")
    return SPECS[key]


# ---- tokenizer ----------------------------------------------------------------------------------------------------

def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE (digits split one by one, so any passkey tokenises the same way) as a transformers fast tokenizer
    that prepends BOS, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, unk_token=None, model_max_length=1 << 20)


def tokenizer_text() -> str:
    return builtin_text("calibration") + "\n\n" + "\n".join([INTRO, FILLER, QUESTION] * 4)


# ---- data ---------------------------------------------------------------------------------------------------------

class TrainingData:
    """Seeded batches [batch, window]: BOS + random crops of the corpus, some rows replaced by passkey documents or by
    repeated random tokens."""

    def __init__(self, tokenizer, window: int, passkey_fraction: float, seed: int, repeat_fraction: float = 0.0):
        self.tokenizer, self.window, self.passkey_fraction = tokenizer, window, passkey_fraction
        self.repeat_fraction = repeat_fraction
        self.bos = tokenizer.bos_token_id
        special = set(tokenizer.all_special_ids)
        self.ordinary_ids = [i for i in range(len(tokenizer)) if i not in special]
        ids = tokenizer(builtin_text("calibration"), add_special_tokens=False)["input_ids"]
        self.stream = torch.tensor(ids, dtype=torch.long)  # [n_tokens]
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)

    def _passkey_row(self) -> torch.Tensor:
        key = str(self.rng.randint(10000, 99999))
        for _ in range(20):
            n_before, n_after = self.rng.randint(0, 3), self.rng.randint(0, 3)
            ids = self.tokenizer(passkey_document(key, n_before, n_after, answer=True))["input_ids"]  # BOS included
            if len(ids) <= self.window:
                break
        else:
            ids = self.tokenizer(passkey_document(key, 0, 0, answer=True))["input_ids"]
        return self._fill_with_text(ids[-self.window:])

    def _fill_with_text(self, ids: list[int]) -> torch.Tensor:
        """`ids` [n <= window] followed by corpus text up to the window (a new BOS marks the new document)."""
        rest = self.window - len(ids)
        if rest:
            start = int(torch.randint(0, self.stream.numel() - rest, (1,), generator=self.gen))
            ids = ids + ([self.bos] + self.stream[start:start + rest - 1].tolist())[:rest]
        return torch.tensor(ids, dtype=torch.long)

    def _repeat_row(self) -> torch.Tensor:
        """BOS, n random tokens, the same n tokens again, then corpus text: only copying predicts the second half, which
        is what forms induction heads (the passkey task is a copy over a longer distance)."""
        n = self.rng.randint(8, (self.window - 1) // 2)
        seq = [self.ordinary_ids[self.rng.randrange(len(self.ordinary_ids))] for _ in range(n)]
        return self._fill_with_text([self.bos] + seq + seq)

    def batch(self, batch_size: int) -> torch.Tensor:
        body = self.window - 1
        starts = torch.randint(0, self.stream.numel() - body, (batch_size,), generator=self.gen)
        rows = torch.stack([self.stream[s:s + body] for s in starts.tolist()])  # [batch, window - 1]
        rows = torch.cat((torch.full((batch_size, 1), self.bos), rows), dim=1)  # [batch, window]
        for i in range(batch_size):
            draw = self.rng.random()
            if draw < self.passkey_fraction:
                rows[i] = self._passkey_row()
            elif draw < self.passkey_fraction + self.repeat_fraction:
                rows[i] = self._repeat_row()
        return rows


# ---- training -----------------------------------------------------------------------------------------------------

def build_model(spec: ZooSpec, bos_id: int, eos_id: int):
    cfg = DecoderConfig.from_hf(spec.hf_config(bos_id, eos_id), source=f"zoo-{spec.name}")
    model = Decoder(cfg)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".ln" in name or name.startswith("ln_final"):
                p.fill_(1.0)
            elif p.dim() == 2:
                std = 0.02 if not name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02 / math.sqrt(2 * spec.n_layers)
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                p.zero_()
    return model


class LoadBalance:
    """The auxiliary loss of Switch / Qwen2-MoE, E * sum_i f_i P_i averaged over MoE layers (f_i: share of routed
    slots, no gradient; P_i: mean router probability), collected through the router hooks during a training forward."""

    def __init__(self, layers: list[int], n_experts: int):
        self.n_experts = n_experts
        self.logits: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []
        self.hooks = []
        for i in layers:
            self.hooks += [(f"blocks.{i}.mlp.hook_router_logits", lambda x, hook: self.logits.append(x)),
                           (f"blocks.{i}.mlp.hook_expert_indices", lambda x, hook: self.indices.append(x))]

    def clear(self) -> None:
        self.logits.clear()
        self.indices.clear()

    def loss(self) -> torch.Tensor:
        terms = []
        for logits, idx in zip(self.logits, self.indices):
            probs = logits.float().softmax(-1).reshape(-1, self.n_experts).mean(0)  # [E]
            share = torch.bincount(idx.reshape(-1), minlength=self.n_experts).float() / idx.numel()  # [E]
            terms.append(self.n_experts * (share * probs).sum())
        return torch.stack(terms).mean()


def load_balance_hooks(model) -> LoadBalance:
    from residscope.model.moe import moe_layers

    return LoadBalance(moe_layers(model), model.cfg.n_experts)


def lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(spec: ZooSpec, tokenizer, settings: TrainSettings, *, progress: bool = True):
    """Train one model from scratch; returns (model, info dict)."""
    torch.manual_seed(settings.seed)
    data = TrainingData(tokenizer, spec.window, settings.passkey_fraction, settings.seed, settings.repeat_fraction)
    model = build_model(spec, tokenizer.bos_token_id, tokenizer.eos_token_id)
    model.train()
    balance = load_balance_hooks(model) if spec.n_experts else None
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=settings.lr, betas=(0.9, 0.95))
    start, cpu_start, losses = time.time(), time.process_time(), []
    bar = tqdm(range(settings.steps), desc=f"zoo-{spec.name}", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        ids = data.batch(settings.batch_size)  # [batch, window]
        if balance is None:
            logits = model(ids)  # [batch, window, vocab]
        else:
            balance.clear()
            with model.hooks(fwd_hooks=balance.hooks):
                logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        if balance is not None:
            loss = loss + AUX_LOSS * balance.loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    info = {
        "name": f"zoo-{spec.name}",
        "spec": asdict(spec),
        "settings": asdict(settings),
        "seed": settings.seed,
        "steps": settings.steps,
        "tokens_seen": settings.steps * settings.batch_size * spec.window,
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "train_seconds": round(time.time() - start, 1),  # wall clock: on a shared machine this depends on the load
        "train_cpu_seconds": round(time.process_time() - cpu_start, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "data": f"builtin:pydoc_data.topics/calibration crops of {spec.window - 1} tokens after BOS, "
                f"{settings.passkey_fraction:.0%} of rows passkey documents, {settings.repeat_fraction:.0%} repeated random tokens",
    }
    return model, info


def save(model, tokenizer, spec: ZooSpec, info: dict, out: Path) -> Path:
    """Write the folder atomically (`atomic_dir`: a temp folder beside `out`, renamed into place; an old `out` is replaced)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_dir(out) as tmp:
        save_file(local_to_hf(state, model.cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(spec.hf_config(tokenizer.bos_token_id, tokenizer.eos_token_id), indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        (tmp / "residscope_zoo.json").write_text(json.dumps(info, indent=2) + "\n")
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m residscope.analyses.zoo_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", help=f"one model: {', '.join('zoo-' + n for n in SPECS)}")
    parser.add_argument("--all", action="store_true", help="train every zoo model")
    parser.add_argument("--out", required=True, help="output folder (with --all: the parent; each model goes to OUT/<name>)")
    parser.add_argument("--force", action="store_true", help="replace non-empty output folders (e.g. the shipped zoo)")
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if bool(args.name) == args.all:
        parser.error("give exactly one of --name or --all")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = TrainSettings(steps=args.steps)
    specs = [SPECS[n] for n in ZOO_NAMES] if args.all else [spec_for(args.name)]
    targets = [Path(args.out) / spec.name if args.all else Path(args.out) for spec in specs]
    try:
        for target in targets:  # before hours of training
            check_output_dir(target, "--out", force=args.force)
    except InputError as e:
        parser.error(str(e))
    tokenizer = train_tokenizer(tokenizer_text(), specs[0].vocab_size)
    command = "python -m residscope.analyses.zoo_train " + " ".join(sys.argv[1:] if argv is None else argv)
    for spec, target in zip(specs, targets):
        model, info = train(spec, tokenizer, settings)
        info["command"] = command
        folder = save(model, tokenizer, spec, info, target)
        print(f"zoo-{spec.name}: final loss {info['final_loss']}, {info['train_seconds']} s -> {folder}")


if __name__ == "__main__":
    main()
