"""Language-specific neurons by LAPE (Tang et al. 2024, "Language-Specific Neurons: The Key to
Multilingual Capabilities in Large Language Models").

For neuron j of layer l and language k, p[l, j, k] is the share of language k's tokens on which the
neuron is activated (activation > 0). Normalised over languages, p'[k] = p[k] / Σ p, its entropy
H = -Σ p' log p' is low when the neuron fires for few languages. Selection, as in the paper:

1. drop neurons whose activation probability is above the ``filter_rate`` quantile (0.95) of all
   p[l, j, k] for no language (rarely active neurons say nothing);
2. of the rest, keep the ``top_rate`` share (0.01 of all neurons) with the lowest entropy;
3. a kept neuron belongs to each language whose p exceeds the ``bar_rate`` quantile (0.95).

Quantiles are order statistics: the value at position round(n * rate) of the sorted probabilities.
A neuron may belong to several languages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from surgery.errors import SurgeryError


class Neuron(NamedTuple):
    layer: int
    index: int
    score: float  # the activation probability in the neuron's language


@dataclass(frozen=True)
class LapeSettings:
    top_rate: float = 0.01
    filter_rate: float = 0.95
    bar_rate: float = 0.95

    def __post_init__(self):
        for name in ("top_rate", "filter_rate", "bar_rate"):
            v = getattr(self, name)
            if not 0 < v < 1:
                raise SurgeryError(f"LAPE {name} must be between 0 and 1, got {v}")


@dataclass
class LapeResult:
    languages: list[str]
    layers: list[int]
    probs: np.ndarray               # (layers, neurons, languages) activation probabilities
    tokens: dict[str, int]
    entropy: np.ndarray             # (layers, neurons); inf for neurons dropped by the filter
    neurons: dict[str, list[Neuron]]
    filter_value: float
    bar_value: float
    settings: LapeSettings = field(default_factory=LapeSettings)

    def counts(self) -> dict[str, list[int]]:
        """Neurons of each language per layer."""
        out = {}
        for lang, ns in self.neurons.items():
            per = dict.fromkeys(self.layers, 0)
            for n in ns:
                per[n.layer] += 1
            out[lang] = [per[i] for i in self.layers]
        return out

    def to_dict(self) -> dict:
        return {"languages": self.languages, "tokens": self.tokens, "layers": self.layers,
                "neurons_per_layer": int(self.probs.shape[1]),
                "settings": {"top_rate": self.settings.top_rate, "filter_rate": self.settings.filter_rate,
                             "bar_rate": self.settings.bar_rate},
                "filter_value": self.filter_value, "bar_value": self.bar_value,
                "counts": self.counts(), "total": {k: len(v) for k, v in self.neurons.items()},
                "neurons": {k: {str(layer): [n.index for n in v if n.layer == layer]
                                for layer in self.layers if any(n.layer == layer for n in v)}
                            for k, v in self.neurons.items()}}


def _order_stat(flat: np.ndarray, rate: float) -> float:
    k = min(max(round(flat.size * rate), 1), flat.size)
    return float(np.partition(flat, k - 1)[k - 1])


def entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy of the activation probabilities normalised over the last axis (0 log 0 = 0; all-zero rows: 0)."""
    total = probs.sum(-1, keepdims=True)
    p = np.divide(probs, total, out=np.zeros_like(probs, dtype=np.float64), where=total > 0)
    logp = np.log(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logp).sum(-1)


def select(probs: np.ndarray, languages: list[str], layers: list[int], tokens: dict[str, int],
           settings: LapeSettings = LapeSettings()) -> LapeResult:
    """LAPE selection on probs of shape (layers, neurons, languages)."""
    if probs.ndim != 3 or probs.shape[2] != len(languages) or probs.shape[0] != len(layers):
        raise ValueError(f"probs must be (layers, neurons, {len(languages)}), got {probs.shape}")
    if len(languages) < 2:
        raise SurgeryError("language-specific neurons need texts in at least two languages")
    probs = probs.astype(np.float64)
    flat = probs.ravel()
    filter_value = _order_stat(flat, settings.filter_rate)
    bar_value = _order_stat(flat, settings.bar_rate)
    ent = entropy(probs)
    ent[(probs > filter_value).sum(-1) == 0] = np.inf
    n_keep = round(ent.size * settings.top_rate)
    order = np.argsort(ent.ravel(), kind="stable")[:n_keep]
    order = order[np.isfinite(ent.ravel()[order])]
    rows, cols = np.unravel_index(np.sort(order), ent.shape)
    neurons: dict[str, list[Neuron]] = {lang: [] for lang in languages}
    for r, c in zip(rows.tolist(), cols.tolist()):
        for k, lang in enumerate(languages):
            if probs[r, c, k] > bar_value:
                neurons[lang].append(Neuron(layers[r], c, float(probs[r, c, k])))
    return LapeResult(list(languages), list(layers), probs, dict(tokens), ent, neurons, filter_value,
                      bar_value, settings)
