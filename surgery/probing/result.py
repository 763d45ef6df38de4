"""What `surgery probe` found, per model: JSON (format surgery.probe/1), CSV, a table, plots."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field

from surgery.errors import SurgeryError
from surgery.probing.lape import LapeResult, Neuron
from surgery.probing.layerwise import Alignment

PROBE_FORMAT = "surgery.probe/1"


@dataclass
class Probing:
    labels: list[str]
    accuracy: list[float]   # per layer, cross-validated
    std: list[float]
    chance: float

    def to_dict(self) -> dict:
        return {"labels": self.labels, "accuracy": self.accuracy, "std": self.std, "chance": self.chance}


@dataclass
class ModelProbe:
    name: str
    path: str
    layers: list[int]
    tokens: int
    forward_seconds: float
    seconds: float
    lape: LapeResult | None = None
    probing: Probing | None = None
    alignment: dict[str, list[Alignment]] = field(default_factory=dict)   # "en-de" -> per layer

    def to_dict(self) -> dict:
        return {"path": self.path, "layers": self.layers, "tokens": self.tokens,
                "forward_seconds": round(self.forward_seconds, 3), "seconds": round(self.seconds, 3),
                "tokens_per_second": round(self.tokens / self.forward_seconds, 1) if self.forward_seconds else None,
                "lape": self.lape.to_dict() if self.lape else None,
                "probing": self.probing.to_dict() if self.probing else None,
                "alignment": {pair: {k: [getattr(a, k) for a in per] for k in Alignment.__dataclass_fields__}
                              for pair, per in self.alignment.items()}}


@dataclass
class ProbeResult:
    settings: dict
    data: dict
    models: dict[str, ModelProbe] = field(default_factory=dict)

    def neurons(self, language: str, model: str | None = None) -> list[Neuron]:
        """The LAPE neurons of one language (of the only model, or the one named)."""
        m = self._model(model)
        if m.lape is None:
            raise SurgeryError("no language-specific neurons: LAPE needs texts in at least two languages")
        if language not in m.lape.neurons:
            raise SurgeryError(f"no texts in language {language!r} (languages: {', '.join(m.lape.languages)})")
        return m.lape.neurons[language]

    def _model(self, model: str | None) -> ModelProbe:
        if model is None:
            if len(self.models) != 1:
                raise SurgeryError(f"several models were probed; name one of {', '.join(self.models)}")
            return next(iter(self.models.values()))
        if model not in self.models:
            raise SurgeryError(f"no model named {model!r} (models: {', '.join(self.models)})")
        return self.models[model]

    def to_dict(self) -> dict:
        return {"format": PROBE_FORMAT, "settings": self.settings, "data": self.data,
                "models": {n: m.to_dict() for n, m in self.models.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def rows(self):
        """Long-format rows: (model, analysis, key, layer, metric, value)."""
        for name, m in self.models.items():
            if m.probing:
                for layer, a, s in zip(m.layers, m.probing.accuracy, m.probing.std):
                    yield name, "probing", "+".join(m.probing.labels), layer, "accuracy", a
                    yield name, "probing", "+".join(m.probing.labels), layer, "accuracy_std", s
            for pair, per in m.alignment.items():
                for layer, al in zip(m.layers, per):
                    for metric, value in al.to_dict().items():
                        yield name, "alignment", pair, layer, metric, value
            if m.lape:
                for lang, counts in m.lape.counts().items():
                    for layer, c in zip(m.layers, counts):
                        yield name, "lape", lang, layer, "neurons", c

    def to_csv(self, path) -> None:
        with open(path, "w", newline="") as fp:
            w = csv.writer(fp)
            w.writerow(["model", "analysis", "key", "layer", "metric", "value"])
            w.writerows(self.rows())

    def format_table(self) -> str:
        lines = []
        for name, m in self.models.items():
            rate = f", {m.tokens / m.forward_seconds:,.0f} tokens/s" if m.forward_seconds else ""
            lines.append(f"{name} ({m.path}): {len(m.layers)} layers, {m.tokens:,} tokens{rate}")
            head = ["layer"]
            cols = []
            if m.probing:
                head.append("probe acc")
                cols.append([f"{a:.3f}" for a in m.probing.accuracy])
            for pair, per in m.alignment.items():
                head += [f"{pair} cos", f"{pair} rand", f"{pair} retr"]
                cols += [[f"{a.pair_cosine:.3f}" for a in per], [f"{a.random_cosine:.3f}" for a in per],
                         [f"{(a.retrieval + a.retrieval_back) / 2:.3f}" for a in per]]
            if m.lape:
                for lang, counts in m.lape.counts().items():
                    head.append(f"{lang} neurons")
                    cols.append([str(c) for c in counts])
            widths = [max(len(h), 5) for h in head]
            lines.append("  " + "  ".join(h.rjust(w) for h, w in zip(head, widths)))
            for r, layer in enumerate(m.layers):
                cells = [str(layer)] + [c[r] for c in cols]
                lines.append("  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths)))
            if m.probing:
                lines.append(f"  probing labels: {', '.join(m.probing.labels)} (chance {m.probing.chance:.3f}); "
                             "retr = mean retrieval accuracy of both directions")
            if m.lape:
                total = ", ".join(f"{k} {len(v)}" for k, v in m.lape.neurons.items())
                lines.append(f"  language-specific neurons: {total} (of {len(m.layers) * m.lape.probs.shape[1]:,})")
            lines.append("")
        return "\n".join(lines).rstrip()

    def plot(self, path) -> list[str]:
        from surgery.probing.plot import plot_probe

        return plot_probe(self, path)
