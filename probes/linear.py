"""Linear probes on cached residual-stream activations, one per layer, with a shuffled-label control.

Protocol (the same for every target):
- features are standardised (StandardScaler fitted on the training tokens only) and fed to Ridge regression (metric R²) or
  class-balanced logistic regression (metric ROC AUC); the regularisation strength is chosen per layer from a small grid
  on a held-out third of the training samples;
- train and test are split by SAMPLE (sequence), never by token, so tokens of one text never sit on both sides;
- the control fits the same probe on training labels permuted across training tokens and scores it on the true test labels:
  a probe is informative where its score clearly beats the control (R² ~ 0 or below, AUC ~ 0.5 for the control).

Layers are residual-stream layers as in `analyses.positional`: 0 = embeddings, l = output of block l-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from residscope.runtime.distributed import LOCAL
from residscope.analyses.positional import resid_hook_name
from residscope.runtime.runner import forward_batches
from residscope.model.errors import InputError

TASKS = ("regression", "classification")


@dataclass
class Activations:
    """Residual-stream activations of whole samples, capped at `max_tokens`.

    features: {layer: [n_tokens, d_model] float32}; sample, position, token: [n_tokens] per-token metadata.
    """

    features: dict[int, np.ndarray]
    sample: np.ndarray
    position: np.ndarray
    token: np.ndarray

    @property
    def layers(self) -> list[int]:
        return sorted(self.features)

    @property
    def n_tokens(self) -> int:
        return len(self.sample)


@torch.no_grad()
def collect_activations(model, batches: Iterable[torch.Tensor], *, layers: Sequence[int] | None = None,
                        max_tokens: int = 8192, progress: bool = True) -> Activations:
    """Residual streams at `layers` (default: all, 0..n_layers) for whole samples until `max_tokens` tokens are held.

    Batches stream through the model; each hook copies its layer to CPU float32 at once, and the forward stops after the
    deepest requested layer. The last sample is truncated to respect the cap.
    """
    n_resid = model.cfg.n_layers + 1
    layers = list(range(n_resid)) if layers is None else sorted({int(layer) for layer in layers})
    for layer in layers:
        if not 0 <= layer < n_resid:
            raise InputError(f"layer {layer} out of range: residual layers are 0 (embeddings) .. {n_resid - 1}")
    if max_tokens < 1:
        raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
    chunks: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    sample, position, token = [], [], []
    held, next_sample = 0, 0
    chosen, budgets = [], []  # the batches the cap reaches, and (rows, tokens) kept of each
    for ids in batches:
        if held >= max_tokens:
            break
        b, t = ids.shape
        take = min(max_tokens - held, b * t)
        rows = -(-take // t)  # samples touched by the cap
        chosen.append(ids)
        budgets.append((rows, take))
        sample.append((next_sample + np.arange(rows)[:, None].repeat(t, 1)).reshape(-1)[:take])
        position.append(np.tile(np.arange(t), rows)[:take])
        token.append(ids[:rows].reshape(-1)[:take].cpu().numpy())
        held += take
        next_sample += b

    def keep(layer: int, rows: int, take: int):
        def hook(resid: torch.Tensor, hook) -> None:
            flat = resid.detach()[:rows].float().cpu().reshape(-1, resid.shape[-1])  # [rows * pos, d_model]
            chunks[layer].append(flat[:take].numpy())

        return hook

    def hooks_for(index: int, ids, mask) -> list:
        return [(resid_hook_name(layer), keep(layer, *budgets[index])) for layer in layers]

    # every rank's probes see the same tokens: no sharding (LOCAL), even under torch.distributed
    for _ in forward_batches(model, chosen, hooks=hooks_for, stop_at_layer=max(max(layers), 1), group=LOCAL,
                             progress=progress, desc="activations"):
        pass
    if held == 0:
        raise InputError("no batches given")
    return Activations(features={layer: np.concatenate(chunks[layer]) for layer in layers}, sample=np.concatenate(sample),
                       position=np.concatenate(position), token=np.concatenate(token))


# ---------------------------------------------------------------------------------------------------------------------
# one probe
# ---------------------------------------------------------------------------------------------------------------------
def split_by_sample(groups: np.ndarray, test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) token indices with every sample (group) entirely on one side."""
    from sklearn.model_selection import GroupShuffleSplit

    if len(np.unique(groups)) < 2:
        raise InputError("probes need at least 2 samples to split train/test by sample")
    splitter = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    return next(splitter.split(np.zeros(len(groups)), groups=groups))


def _make_probe(task: str, strength: float, seed: int):
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if task == "regression":
        return make_pipeline(StandardScaler(), Ridge(alpha=strength))
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0 / strength, class_weight="balanced", max_iter=2000,
                                                              random_state=seed))


def _score(task: str, probe, x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import r2_score, roc_auc_score

    if task == "regression":
        return float(r2_score(y, probe.predict(x)))
    return float(roc_auc_score(y, probe.predict_proba(x)[:, 1]))


# Regularisation strengths tried for each task (Ridge alpha, and 1/C of the logistic regression) on standardised features.
STRENGTHS = {"regression": (1.0, 1e2, 1e4), "classification": (1e1, 1e2, 1e3)}


def choose_strength(x: np.ndarray, y: np.ndarray, train: np.ndarray, groups: np.ndarray, *, task: str, seed: int = 0) -> float:
    """The strength in STRENGTHS[task] that scores best on a held-out third of the training samples (split by sample)."""
    inner_fit, inner_val = split_by_sample(groups[train], 1 / 3, seed + 1)
    fit_idx, val_idx = train[inner_fit], train[inner_val]
    if task == "classification" and (len(np.unique(y[fit_idx])) < 2 or len(np.unique(y[val_idx])) < 2):
        return STRENGTHS[task][1]
    best = max(STRENGTHS[task], key=lambda a: _score(task, _make_probe(task, a, seed).fit(x[fit_idx], y[fit_idx]),
                                                      x[val_idx], y[val_idx]))
    return float(best)


def fit_probe(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, *, task: str, strength: float | None = None,
              groups: np.ndarray | None = None, seed: int = 0) -> tuple[float, float, float]:
    """(score, shuffled-label control score, strength) of one linear probe on features x [n, d] and targets y [n].

    strength=None chooses it with `choose_strength` (needs `groups`, the sample of each token); the control uses the same.
    """
    if task not in TASKS:
        raise InputError(f"task must be one of {TASKS}, got {task!r}")
    if task == "classification" and (len(np.unique(y[train])) < 2 or len(np.unique(y[test])) < 2):
        raise InputError("classification probe: both classes must occur in the train and the test samples")
    if strength is None:
        if groups is None:
            raise InputError("fit_probe: pass a strength, or the groups (sample of each token) to choose one")
        strength = choose_strength(x, y, train, groups, task=task, seed=seed)
    score = _score(task, _make_probe(task, strength, seed).fit(x[train], y[train]), x[test], y[test])
    shuffled = np.random.default_rng(seed).permutation(y[train])
    control = _score(task, _make_probe(task, strength, seed).fit(x[train], shuffled), x[test], y[test])
    return score, control, strength


# ---------------------------------------------------------------------------------------------------------------------
# one probe per layer
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ProbeScores:
    """Score per layer of one target, with the shuffled-label control. metric: "r2" or "auc"."""

    target: str
    metric: str
    layers: list[int]
    score: np.ndarray  # [layer]
    control: np.ndarray  # [layer]
    strength: np.ndarray  # [layer] regularisation chosen (Ridge alpha or 1/C)
    n_train: int
    n_test: int

    def to_dict(self) -> dict:
        return dict(target=self.target, metric=self.metric, layers=self.layers, score=self.score.round(4).tolist(),
                    control=self.control.round(4).tolist(), strength=self.strength.tolist(), n_train=self.n_train, n_test=self.n_test)


def probe_layers(acts: Activations, y: np.ndarray, *, target: str, task: str, strength: float | None = None,
                 test_fraction: float = 0.25, seed: int = 0, progress: bool = True) -> ProbeScores:
    """Fit one probe per layer of `acts` for per-token targets y [n_tokens], split by sample."""
    y = np.asarray(y)
    if y.shape != (acts.n_tokens,):
        raise InputError(f"target {target!r}: expected {acts.n_tokens} values, got shape {y.shape}")
    train, test = split_by_sample(acts.sample, test_fraction, seed)
    rows = [fit_probe(acts.features[layer], y, train, test, task=task, strength=strength, groups=acts.sample, seed=seed)
            for layer in tqdm(acts.layers, desc=f"probe {target}", disable=not progress, leave=False)]
    score, control, strengths = (np.array(col) for col in zip(*rows))
    return ProbeScores(target=target, metric="r2" if task == "regression" else "auc", layers=acts.layers, score=score,
                       control=control, strength=strengths, n_train=len(train), n_test=len(test))


def position_probe(acts: Activations, **kw) -> ProbeScores:
    """Ridge probe for log(1 + absolute position); R² per layer."""
    return probe_layers(acts, np.log1p(acts.position), target="log position", task="regression", **kw)


def first_tokens_probe(acts: Activations, k: int = 4, **kw) -> ProbeScores:
    """Logistic probe for "is one of the first k tokens"; ROC AUC per layer."""
    return probe_layers(acts, (acts.position < k).astype(int), target=f"first {k} tokens", task="classification", **kw)
