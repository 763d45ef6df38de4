"""The result of `surgery eval`: a row per model or recipe, a column per data set and metric.

    report.format()          # the terminal table
    report.to_dict()         # JSON, schema "surgery.eval/1" (docs/eval.md)
    report.to_csv()          # long form: target,kind,data,metric,value
    report.plot("eval.png")  # grouped bars, one panel per data set and metric

The schema name changes only when a field changes meaning or disappears (fields may be added).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "surgery.eval/1"
LOWER_IS_BETTER = {"perplexity", "bits_per_byte"}


@dataclass
class EvalRow:
    target: str
    kind: str                       # 'checkpoint' or 'recipe'
    scores: dict[str, dict[str, float]]
    seconds: float = 0.0


@dataclass
class EvalReport:
    rows: list[EvalRow]
    datasets: list[dict] = field(default_factory=list)  # name, kind, path, items (and lm-eval tasks)
    settings: dict = field(default_factory=dict)

    def columns(self) -> list[tuple[str, str]]:
        cols = []
        for row in self.rows:
            for data, metrics in row.scores.items():
                cols += [(data, m) for m in metrics if (data, m) not in cols]
        return cols

    def value(self, target: str, data: str, metric: str) -> float | None:
        for row in self.rows:
            if row.target == target:
                return row.scores.get(data, {}).get(metric)
        raise KeyError(target)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "settings": self.settings, "datasets": self.datasets,
                "results": [{"target": r.target, "kind": r.kind, "seconds": round(r.seconds, 3), "scores": r.scores}
                            for r in self.rows]}

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["target", "kind", "data", "metric", "value"])
        for r in self.rows:
            for data, metrics in r.scores.items():
                for metric, value in metrics.items():
                    w.writerow([r.target, r.kind, data, metric, repr(value)])
        return buf.getvalue()

    def format(self) -> str:
        cols = self.columns()
        header = ["target"] + [f"{d} {m}" for d, m in cols]
        body = [[r.target] + [_fmt(r.scores.get(d, {}).get(m)) for d, m in cols] for r in self.rows]
        widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                 for line in [header] + body]
        lines.insert(1, "  ".join("-" * w for w in widths))
        notes = [f"{m}: lower is better" for m in sorted({m for _, m in cols} & LOWER_IS_BETTER)]
        return "\n".join(lines + ([f"({'; '.join(notes)})"] if notes else []))

    def plot(self, path: str | Path) -> Path:
        """Grouped bars: one panel per (data set, metric), one bar per target, colours shared."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = self.columns()
        n = max(len(cols), 1)
        ncols = min(n, 4)
        nrows = math.ceil(n / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols + 1, 2.8 * nrows + 0.6), squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        targets = [r.target for r in self.rows]
        for k, (data, metric) in enumerate(cols):
            ax = axes[k // ncols][k % ncols]
            values = [r.scores.get(data, {}).get(metric, float("nan")) for r in self.rows]
            ax.bar(range(len(values)), values, color=[colors[i % len(colors)] for i in range(len(values))])
            ax.set_title(f"{data}: {metric}" + (" (lower is better)" if metric in LOWER_IS_BETTER else ""), fontsize=9)
            ax.set_xticks([])
            if metric not in LOWER_IS_BETTER and all(0 <= v <= 1 for v in values if v == v):
                ax.set_ylim(0, 1)  # accuracies and match rates share one scale
        for k in range(len(cols), nrows * ncols):
            axes[k // ncols][k % ncols].axis("off")
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[i % len(colors)]) for i in range(len(targets))]
        fig.legend(handles, targets, loc="lower center", ncol=min(len(targets), 4), fontsize=8)
        fig.tight_layout(rect=(0, 0.08 + 0.02 * math.ceil(len(targets) / 4), 1, 1))
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if abs(value) >= 100 else f"{value:.4f}"
