"""Accumulators behind `surgery diff`: sums pooled per tensor, layer, group and expert pair, from which
the statistics in ``analysis.ranking`` are derived at the end of the stream."""

from __future__ import annotations

import math

from surgery.analysis.ranking import ExpertDiff, PairStats, Stats, TensorStats


class Acc:
    """Sums from which Stats are derived; adding two Acc pools their entries."""

    __slots__ = ("numel", "sq", "bsq", "bd", "abs_sum", "max_abs", "changed")

    def __init__(self):
        self.numel = self.changed = 0
        self.sq = self.bsq = self.bd = self.abs_sum = self.max_abs = 0.0

    @classmethod
    def of_tensor(cls, numel: int, sums, bsq: float) -> "Acc":
        """The sums ``analysis.stream.tensor_sums`` gives for one expert on one tensor."""
        a = cls()
        a.numel, a.sq, a.bsq, a.bd = numel, sums.sq, bsq, sums.bd
        a.abs_sum, a.max_abs, a.changed = sums.abs_sum, sums.max_abs, sums.changed
        return a

    def add(self, o: "Acc") -> "Acc":
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


class PairAcc:
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


def layer_group(info) -> str:
    return info.group if info.group in ("attn", "mlp", "norm") else "other"


def outer_group(info) -> str:
    if info.kind == "norm" and "embed" in info.name.lower():
        return "embed"  # e.g. BERT's embeddings.LayerNorm belongs with the embeddings
    return {"final_norm": "norm"}.get(info.kind, info.group if info.group in ("embed", "lm_head", "norm") else "other")


def sqrt_scores(v):
    import numpy as np

    return np.sqrt(np.maximum(v.double().numpy(), 0.0))


class ExpertAcc:
    """Everything the diff pools for one expert, tensor by tensor."""

    def __init__(self):
        self.tensors: list[TensorStats] = []
        self.layers: dict[int, Acc] = {}
        self.groups: dict[int, dict[str, Acc]] = {}
        self.outer: dict[str, Acc] = {}
        self.vectors: dict[str, dict] = {"neurons": {}, "heads": {}}  # layer -> summed squares per neuron/head

    def add(self, name: str, info, acc: Acc, vec=None, target: str | None = None) -> None:
        self.tensors.append(acc.stats(TensorStats, name=name, layer=info.layer, kind=info.kind, group=info.group))
        if info.layer is None:
            self.outer.setdefault(outer_group(info), Acc()).add(acc)
            return
        self.layers.setdefault(info.layer, Acc()).add(acc)
        self.groups.setdefault(info.layer, {}).setdefault(layer_group(info), Acc()).add(acc)
        if vec is not None:
            store = self.vectors[target]
            store[info.layer] = vec if info.layer not in store else store[info.layer] + vec

    def result(self, name: str, ref: str) -> ExpertDiff:
        total = Acc()
        for a in [*self.layers.values(), *self.outer.values()]:
            total.add(a)
        return ExpertDiff(
            name=name, ref=ref, tensors=self.tensors, layers={i: a.stats() for i, a in sorted(self.layers.items())},
            layer_groups={i: {g: a.stats() for g, a in sorted(gs.items())} for i, gs in sorted(self.groups.items())},
            outer={g: a.stats() for g, a in sorted(self.outer.items())}, total=total.stats(),
            neuron_scores={i: sqrt_scores(v) for i, v in sorted(self.vectors["neurons"].items())},
            head_scores={i: sqrt_scores(v) for i, v in sorted(self.vectors["heads"].items())})


class PairAccs:
    """Agreement sums of one expert pair, per layer and outside layers."""

    def __init__(self):
        self.layers: dict[int, PairAcc] = {}
        self.outer = PairAcc()

    def add(self, layer: int | None, dot: float, sqa: float, sqb: float, agree: int, both: int) -> None:
        p = PairAcc()
        p.dot, p.sqa, p.sqb, p.agree, p.both = dot, sqa, sqb, agree, both
        (self.layers.setdefault(layer, PairAcc()) if layer is not None else self.outer).add(p)

    def result(self) -> dict:
        total = PairAcc()
        for a in [*self.layers.values(), self.outer]:
            total.add(a)
        return {"layers": {i: a.stats() for i, a in sorted(self.layers.items())}, "outer": self.outer.stats(),
                "total": total.stats()}
