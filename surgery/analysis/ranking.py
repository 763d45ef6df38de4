"""Results of `surgery diff`: change statistics per tensor, layer, module group and expert pair,
with rankings (layers, neurons, heads) and neuron-set overlap. Built by ``surgery.analysis.diff``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import SurgeryError

METRICS = ("relative", "delta_norm", "mean_abs", "max_abs", "frac_changed")


@dataclass
class Stats:
    """Change statistics of one tensor or of a group of tensors (pooled over their entries)."""

    numel: int
    delta_norm: float             # ||Δ||_F
    base_norm: float              # ||W_base||_F
    relative: float | None        # ||Δ||_F / ||W_base||_F (None when the base is all zeros)
    mean_abs: float               # mean |Δ|
    max_abs: float                # max |Δ|
    cosine: float | None          # cos(W_expert, W_base) over the flattened entries
    frac_changed: float           # share of entries with |Δ| > tol

    def value(self, metric: str) -> float:
        v = getattr(self, metric)
        return 0.0 if v is None else v


@dataclass
class TensorStats(Stats):
    name: str = ""
    layer: int | None = None
    kind: str = ""
    group: str = ""


@dataclass
class PairStats:
    """Agreement of two experts' task vectors Δ_a, Δ_b over a set of entries."""

    cosine: float | None          # <Δ_a, Δ_b> / (||Δ_a|| ||Δ_b||)
    sign_agreement: float | None  # share of entries with Δ_a·Δ_b > 0 among those where both are non-zero
    both_changed: int             # entries where both deltas are non-zero


@dataclass
class Neuron:
    layer: int
    index: int
    score: float


@dataclass
class Overlap:
    a: str
    b: str
    layer: int | None     # None: all layers pooled
    k: int                # nominal set size (sum over layers for the pooled row)
    size_a: int
    size_b: int
    intersection: int
    union: int
    jaccard: float | None  # |A∩B| / |A∪B|
    overlap: float | None  # |A∩B| / k  (Wang et al. 2024)


@dataclass
class ExpertDiff:
    name: str
    ref: str
    tensors: list[TensorStats]
    layers: dict[int, Stats]                   # all tensors of a layer
    layer_groups: dict[int, dict[str, Stats]]  # layer -> group (attn, mlp, norm, other) -> stats
    outer: dict[str, Stats]                    # tensors outside layers: embed, lm_head, norm, other
    total: Stats
    neuron_scores: dict[int, "object"] = field(default_factory=dict)  # layer -> float64 numpy [intermediate]
    head_scores: dict[int, "object"] = field(default_factory=dict)    # layer -> float64 numpy [num_heads]


@dataclass
class DiffResult:
    base: str
    experts: dict[str, ExpertDiff]
    # (a, b) -> {"layers": {layer: PairStats}, "outer": PairStats, "total": PairStats}
    pairs: dict[tuple[str, str], dict]
    num_layers: int
    tol: float
    heads_note: str = ""                  # why head scores are missing, when they are

    # ---- rankings ------------------------------------------------------
    def expert(self, name: str) -> ExpertDiff:
        if name not in self.experts:
            raise SurgeryError(f"unknown expert {name!r} (experts: {', '.join(self.experts)})")
        return self.experts[name]

    def layer_ranking(self, expert: str, metric: str = "relative", group: str | None = None) -> list[tuple[int, float]]:
        """Layers sorted by change (largest first), as (layer, score)."""
        if metric not in METRICS:
            raise SurgeryError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
        e = self.expert(expert)
        if group is None:
            scores = {i: s.value(metric) for i, s in e.layers.items()}
        else:
            scores = {i: g[group].value(metric) for i, g in e.layer_groups.items() if group in g}
        return sorted(scores.items(), key=lambda t: (-t[1], t[0]))

    def top_neurons(self, expert: str, k: int | float, per_layer: bool = True,
                    layers: list[int] | None = None) -> list[Neuron]:
        """The k most-changed MLP neurons, per layer or over all layers. Unchanged neurons are never chosen."""
        return _top(self.expert(expert).neuron_scores, k, per_layer, layers, "neurons")

    def top_heads(self, expert: str, k: int | float, per_layer: bool = True,
                  layers: list[int] | None = None) -> list[Neuron]:
        """The k most-changed attention heads (query-head index), per layer or over all layers."""
        if not self.expert(expert).head_scores:
            raise SurgeryError(f"no head scores: {self.heads_note or 'heads were not analysed'}")
        return _top(self.expert(expert).head_scores, k, per_layer, layers, "heads")

    def neuron_overlap(self, a: str, b: str, k: int | float, per_layer: bool = True) -> list[Overlap]:
        """Overlap of two experts' top-k neuron sets: one row per layer, then a pooled row (layer None)."""
        sa, sb = self.top_neurons(a, k, per_layer), self.top_neurons(b, k, per_layer)
        scores = self.expert(a).neuron_scores
        rows = []
        if per_layer:
            for layer in sorted(scores):
                ka = _resolve_k(k, len(scores[layer]), "neurons")
                A = {n.index for n in sa if n.layer == layer}
                B = {n.index for n in sb if n.layer == layer}
                rows.append(_overlap(a, b, layer, ka, A, B))
            k_all = sum(r.k for r in rows)
        else:
            k_all = _resolve_k(k, sum(len(v) for v in scores.values()), "neurons")
        A = {(n.layer, n.index) for n in sa}
        B = {(n.layer, n.index) for n in sb}
        rows.append(_overlap(a, b, None, k_all, A, B))
        return rows

    # ---- outputs (analysis/formats.py, analysis/plot.py) -----------------
    def to_dict(self, k: int | float = 10, per_layer: bool = True) -> dict:
        from surgery.analysis.formats import to_dict

        return to_dict(self, k, per_layer)

    def to_json(self, k: int | float = 10, per_layer: bool = True, indent: int | None = 2) -> str:
        import json

        return json.dumps(self.to_dict(k, per_layer), indent=indent)

    def to_csv(self, path: str | Path | None = None) -> str:
        from surgery.analysis.formats import to_csv

        return to_csv(self, path)

    def format_table(self, k: int | float = 10, metric: str = "relative") -> str:
        from surgery.analysis.formats import format_table

        return format_table(self, k, metric)

    def plot_heatmap(self, path: str | Path, metric: str = "relative") -> Path:
        from surgery.analysis.plot import plot_heatmap

        return plot_heatmap(self, path, metric)

    def plot_layers(self, path: str | Path, metric: str = "relative") -> Path:
        from surgery.analysis.plot import plot_layers

        return plot_layers(self, path, metric)


def _resolve_k(k: int | float, n: int, what: str) -> int:
    """k as a count (int >= 1) or a fraction of n (0 < k < 1, rounded, at least 1)."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise SurgeryError(f"top-k must be a count or a fraction, got {k!r}")
    if isinstance(k, float) and not k.is_integer():
        if not 0.0 < k < 1.0:
            raise SurgeryError(f"top-k fraction must be between 0 and 1, got {k}")
        return max(1, round(k * n))
    if k < 1:
        raise SurgeryError(f"top-k must be at least 1 (or a fraction like 0.01), got {k}")
    return min(int(k), n)


def _top(scores: dict, k, per_layer, layers, what) -> list[Neuron]:
    import numpy as np

    if not scores:
        raise SurgeryError(f"no {what} were scored (no MLP/attention tensors matched the layout)")
    chosen = sorted(scores) if layers is None else [i for i in sorted(scores) if i in set(layers)]
    out: list[Neuron] = []
    if per_layer:
        for layer in chosen:
            s = scores[layer]
            n = _resolve_k(k, len(s), what)
            idx = np.argsort(-s, kind="stable")[:n]
            out += [Neuron(layer, int(j), float(s[j])) for j in idx if s[j] > 0]
        return out
    flat = [(float(s[j]), layer, int(j)) for layer in chosen for s in [scores[layer]] for j in range(len(s))]
    n = _resolve_k(k, len(flat), what)
    flat.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [Neuron(layer, j, sc) for sc, layer, j in flat[:n] if sc > 0]


def _overlap(a, b, layer, k, A: set, B: set) -> Overlap:
    inter, union = len(A & B), len(A | B)
    return Overlap(a, b, layer, k, len(A), len(B), inter, union,
                   inter / union if union else None, inter / k if k else None)
