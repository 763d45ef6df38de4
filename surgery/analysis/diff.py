"""Where did each expert change? Streaming delta statistics, rankings and overlap.

    result = diff("base/", {"sw": "sw-expert/", "math": "math-expert/"})
    result.layer_ranking("sw")[:4]           # [(7, 0.031), (6, 0.029), (0, 0.027), (1, 0.025)]
    result.top_neurons("sw", k=0.01)         # the 1% most-changed MLP neurons of every layer
    result.neuron_overlap("sw", "math", k=50)
    result.to_json(); result.to_csv("d.csv"); result.plot_heatmap("d.png")

One pass over the tensors, in file order: for each tensor the base and every expert are read,
the deltas Δ = W_expert - W_base are formed in float32 and reduced to a few sums, then dropped.
Memory holds one tensor per checkpoint (plus the next one, read ahead), never a model.
Formulas and the JSON schema: docs/analysis.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from surgery.analysis.stream import head_spec, head_vec, neuron_vec, read_ahead, tensor_sums, vec_axis
from surgery.errors import SurgeryError

FLOATING = {"F64", "F32", "F16", "BF16"}
METRICS = ("relative", "delta_norm", "mean_abs", "max_abs", "frac_changed")


# ---------------------------------------------------------------------------- results

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
    pairs: dict[tuple[str, str], dict]   # (a, b) -> {"layers": {layer: PairStats}, "outer": PairStats, "total": PairStats}
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

    # ---- outputs (analysis_report.py) ----------------------------------
    def to_dict(self, k: int | float = 10, per_layer: bool = True) -> dict:
        from surgery.analysis.report import to_dict

        return to_dict(self, k, per_layer)

    def to_json(self, k: int | float = 10, per_layer: bool = True, indent: int | None = 2) -> str:
        import json

        return json.dumps(self.to_dict(k, per_layer), indent=indent)

    def to_csv(self, path: str | Path | None = None) -> str:
        from surgery.analysis.report import to_csv

        return to_csv(self, path)

    def format_table(self, k: int | float = 10, metric: str = "relative") -> str:
        from surgery.analysis.report import format_table

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


# ---------------------------------------------------------------------------- accumulation

class _Acc:
    """Sums from which Stats are derived; adding two _Acc pools their entries."""

    __slots__ = ("numel", "sq", "bsq", "bd", "abs_sum", "max_abs", "changed")

    def __init__(self):
        self.numel = self.changed = 0
        self.sq = self.bsq = self.bd = self.abs_sum = self.max_abs = 0.0

    def add(self, o: "_Acc") -> "_Acc":
        self.numel += o.numel
        self.changed += o.changed
        self.sq += o.sq
        self.bsq += o.bsq
        self.bd += o.bd
        self.abs_sum += o.abs_sum
        self.max_abs = max(self.max_abs, o.max_abs)
        return self

    def stats(self, cls=Stats, **extra) -> Stats:
        dn, bn = math.sqrt(max(self.sq, 0.0)), math.sqrt(max(self.bsq, 0.0))
        esq = self.bsq + 2 * self.bd + self.sq   # ||W_expert||^2 = ||W_base + Δ||^2
        cos = (self.bsq + self.bd) / math.sqrt(self.bsq * esq) if self.bsq > 0 and esq > 0 else None
        if cos is not None:
            cos = max(-1.0, min(1.0, cos))
        n = max(self.numel, 1)
        return cls(self.numel, dn, bn, dn / bn if bn > 0 else None, self.abs_sum / n, self.max_abs, cos,
                   self.changed / n, **extra)


class _PairAcc:
    __slots__ = ("dot", "sqa", "sqb", "agree", "both")

    def __init__(self):
        self.dot = self.sqa = self.sqb = 0.0
        self.agree = self.both = 0

    def add(self, o):
        self.dot += o.dot
        self.sqa += o.sqa
        self.sqb += o.sqb
        self.agree += o.agree
        self.both += o.both
        return self

    def stats(self) -> PairStats:
        den = math.sqrt(self.sqa * self.sqb)
        return PairStats(self.dot / den if den > 0 else None, self.agree / self.both if self.both else None,
                         self.both)


def _layer_group(info) -> str:
    return info.group if info.group in ("attn", "mlp", "norm") else "other"


def _outer_group(info) -> str:
    if info.kind == "norm" and "embed" in info.name.lower():
        return "embed"  # e.g. BERT's embeddings.LayerNorm belongs with the embeddings
    return {"final_norm": "norm"}.get(info.kind, info.group if info.group in ("embed", "lm_head", "norm") else "other")


# ---------------------------------------------------------------------------- the stream

def open_checkpoint(ref):
    from surgery.io.checkpoint import Checkpoint, TensorSource

    return ref if isinstance(ref, TensorSource) else Checkpoint.open(ref)


def diff(base, experts, *, tol: float = 0.0, neurons: bool = True, heads: bool = True, pairs: bool = True,
         include=None, layout=None, progress: bool = False) -> DiffResult:
    """Compare experts to a base, streaming tensor by tensor.

    ``base``: a Checkpoint or anything Checkpoint.open takes. ``experts``: {name: checkpoint} or a list
    (named after their folders). ``tol``: an entry counts as changed when |Δ| > tol. ``include``: optional
    predicate on TensorInfo to analyse only some tensors (the recipe operations use it).
    """
    from surgery.core.layout import Layout

    if tol < 0:
        raise SurgeryError(f"tolerance must be >= 0, got {tol}")
    base_ck = open_checkpoint(base)
    experts = _name_experts(experts)
    if not experts:
        raise SurgeryError("give at least one expert to compare with the base")
    cks = {n: open_checkpoint(r) for n, r in experts.items()}
    layout = layout or Layout.for_checkpoint(base_ck)
    names = [n for n in base_ck.keys() if base_ck.meta[n].dtype in FLOATING]
    infos = {n: layout.info(n) for n in names}
    if include is not None:
        names = [n for n in names if include(infos[n])]
    for en, ck in cks.items():
        _check_compatible(base_ck, ck, en, names)
    heads_spec, heads_note = (head_spec(base_ck.config, layout) if heads else (None, "not requested"))

    tensor_stats = {n: [] for n in cks}
    layer_accs = {n: {} for n in cks}
    group_accs = {n: {} for n in cks}
    outer_accs = {n: {} for n in cks}
    neuron_sq = {n: {} for n in cks}
    head_sq = {n: {} for n in cks}
    pair_keys = [(a, b) for i, a in enumerate(cks) for b in list(cks)[i + 1:]] if pairs else []
    pair_layer = {p: {} for p in pair_keys}
    pair_outer = {p: _PairAcc() for p in pair_keys}

    import torch
    from tqdm.auto import tqdm

    from surgery.analysis.stream import Scratch

    # chunks are cache-sized: one thread computes them best (the read-ahead thread reads meanwhile);
    # torch's thread pool on such small ops mostly waits at barriers, badly so on a busy machine
    threads, scratch = torch.get_num_threads(), Scratch()
    torch.set_num_threads(1)
    total_bytes = sum(base_ck.meta[n].nbytes for n in names) * (1 + len(cks))
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="surgery diff", disable=not progress,
              leave=False) as bar, _restore_threads(threads):
        for name, b_raw, e_raws in read_ahead(names, base_ck, cks):
            info = infos[name]
            axis, target = vec_axis(info, layout, heads_spec)
            if target == "neurons" and not neurons:
                axis = target = None
            bsq, sums, psums = tensor_sums(b_raw, e_raws, tol, axis, pair_keys, scratch)
            del b_raw, e_raws
            bar.update(base_ck.meta[name].nbytes * (1 + len(cks)))
            for en, s in sums.items():
                acc = _Acc()
                acc.numel, acc.sq, acc.bsq, acc.bd = math.prod(base_ck.meta[name].shape), s.sq, bsq, s.bd
                acc.abs_sum, acc.max_abs, acc.changed = s.abs_sum, s.max_abs, s.changed
                tensor_stats[en].append(acc.stats(TensorStats, name=name, layer=info.layer, kind=info.kind,
                                                  group=info.group))
                if info.layer is None:
                    outer_accs[en].setdefault(_outer_group(info), _Acc()).add(acc)
                    continue
                layer_accs[en].setdefault(info.layer, _Acc()).add(acc)
                group_accs[en].setdefault(info.layer, {}).setdefault(_layer_group(info), _Acc()).add(acc)
                vec = None
                if target == "neurons":
                    vec, store = neuron_vec(s.vec, info), neuron_sq[en]
                elif target == "heads":
                    vec, store = head_vec(s.vec, info, heads_spec), head_sq[en]
                if vec is not None:
                    store[info.layer] = vec if info.layer not in store else store[info.layer] + vec
            for p, (dot, agree, both) in psums.items():
                pacc = _PairAcc()
                pacc.dot, pacc.sqa, pacc.sqb, pacc.agree, pacc.both = dot, sums[p[0]].sq, sums[p[1]].sq, agree, both
                (pair_layer[p].setdefault(info.layer, _PairAcc()) if info.layer is not None
                 else pair_outer[p]).add(pacc)

    n_layers = layout.num_layers(base_ck.keys(), base_ck.config)
    out = {}
    for en, ck in cks.items():
        layers = {i: a.stats() for i, a in sorted(layer_accs[en].items())}
        total = _Acc()
        for a in list(layer_accs[en].values()) + list(outer_accs[en].values()):
            total.add(a)
        out[en] = ExpertDiff(
            name=en, ref=str(ck.ref), tensors=tensor_stats[en], layers=layers,
            layer_groups={i: {g: a.stats() for g, a in sorted(gs.items())} for i, gs in sorted(group_accs[en].items())},
            outer={g: a.stats() for g, a in sorted(outer_accs[en].items())}, total=total.stats(),
            neuron_scores={i: _sqrt(v) for i, v in sorted(neuron_sq[en].items())} if neurons else {},
            head_scores={i: _sqrt(v) for i, v in sorted(head_sq[en].items())} if heads_spec else {})
    pair_out = {}
    for p in pair_keys:
        tot = _PairAcc()
        for a in list(pair_layer[p].values()) + [pair_outer[p]]:
            tot.add(a)
        pair_out[p] = {"layers": {i: a.stats() for i, a in sorted(pair_layer[p].items())},
                       "outer": pair_outer[p].stats(), "total": tot.stats()}
    return DiffResult(str(base_ck.ref), out, pair_out, n_layers, tol,
                      "" if heads_spec else heads_note)


def _name_experts(experts) -> dict:
    if isinstance(experts, dict):
        return dict(experts)
    out = {}
    for ref in experts:
        name = Path(str(getattr(ref, "ref", ref))).name or str(ref)
        while name in out:
            name += "'"
        out[name] = ref
    return out


def _check_compatible(base, ck, name: str, names: list[str]) -> None:
    missing = [n for n in names if n not in ck]
    if missing:
        raise SurgeryError(f"expert {name!r} ({ck.ref}) lacks {len(missing)} tensor(s) of the base, "
                           f"e.g. {missing[0]!r}; is it a fine-tune of the same base model?")
    for n in names:
        if ck.meta[n].shape != base.meta[n].shape:
            raise SurgeryError(f"expert {name!r}: tensor {n!r} has shape {list(ck.meta[n].shape)}, "
                               f"the base has {list(base.meta[n].shape)}")


def _sqrt(v):
    import numpy as np

    return np.sqrt(np.maximum(v.double().numpy(), 0.0))


class _restore_threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.n)
