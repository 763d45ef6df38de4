"""Outputs of a DiffResult: a JSON-ready dict (stable schema), CSV, and the terminal table.

The JSON schema is documented in docs/analysis.md; its name and version are in the "schema" field
and change only when a field changes meaning or disappears (new fields may be added).
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path

SCHEMA = "surgery.diff/1"
STAT_FIELDS = ("numel", "delta_norm", "base_norm", "relative", "mean_abs", "max_abs", "cosine", "frac_changed")
LAYER_GROUPS = ("attn", "mlp", "norm", "other")
OUTER_PARTS = ("embed", "lm_head", "norm", "other")


def _stats(s) -> dict:
    return {f: getattr(s, f) for f in STAT_FIELDS}


def to_dict(r, k=10, per_layer=True) -> dict:
    out = {
        "schema": SCHEMA,
        "base": r.base,
        "experts": {n: e.ref for n, e in r.experts.items()},
        "num_layers": r.num_layers,
        "tol": r.tol,
        "totals": [{"expert": n, **_stats(e.total)} for n, e in r.experts.items()],
        "layers": [],
        "outer": [{"expert": n, "part": p, **_stats(s)} for n, e in r.experts.items() for p, s in e.outer.items()],
        "tensors": [{"expert": n, "name": t.name, "layer": t.layer, "kind": t.kind, "group": t.group, **_stats(t)}
                    for n, e in r.experts.items() for t in e.tensors],
        "layer_ranking": {n: [{"layer": i, "score": s} for i, s in r.layer_ranking(n)] for n in r.experts},
        "pairs": [],
        "neurons": None,
        "heads": None,
        "overlap": [],
    }
    for n, e in r.experts.items():
        for i, s in e.layers.items():
            out["layers"].append({"expert": n, "layer": i, "group": "all", **_stats(s)})
            for g, gs in e.layer_groups.get(i, {}).items():
                out["layers"].append({"expert": n, "layer": i, "group": g, **_stats(gs)})
    for (a, b), p in r.pairs.items():
        for i, ps in p["layers"].items():
            out["pairs"].append({"a": a, "b": b, "scope": "layer", "layer": i, **asdict(ps)})
        out["pairs"].append({"a": a, "b": b, "scope": "outer", "layer": None, **asdict(p["outer"])})
        out["pairs"].append({"a": a, "b": b, "scope": "total", "layer": None, **asdict(p["total"])})
    if any(e.neuron_scores for e in r.experts.values()):
        out["neurons"] = {"k": k, "per_layer": per_layer,
                          "top": [{"expert": n, **asdict(x)}
                                  for n in r.experts for x in r.top_neurons(n, k, per_layer)]}
        names = list(r.experts)
        out["overlap"] = [asdict(o) for i, a in enumerate(names) for b in names[i + 1:]
                          for o in r.neuron_overlap(a, b, k, per_layer)]
    if any(e.head_scores for e in r.experts.values()):
        out["heads"] = {"k": k, "per_layer": per_layer,
                        "top": [{"expert": n, **asdict(x)} for n in r.experts for x in r.top_heads(n, k, per_layer)]}
    elif r.heads_note:
        out["heads"] = {"note": r.heads_note}
    return out


CSV_COLUMNS = ("expert", "level", "layer", "group", "kind", "name") + STAT_FIELDS


def to_csv(r, path=None) -> str:
    """One row per statistic: level is tensor, layer (group 'all' or a module group), outer or total."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)

    def row(expert, level, layer, group, kind, name, s):
        w.writerow([expert, level, "" if layer is None else layer, group, kind, name]
                   + ["" if getattr(s, f) is None else _num(getattr(s, f)) for f in STAT_FIELDS])

    for n, e in r.experts.items():
        row(n, "total", None, "all", "", "", e.total)
        for i, s in e.layers.items():
            row(n, "layer", i, "all", "", "", s)
            for g, gs in e.layer_groups.get(i, {}).items():
                row(n, "layer", i, g, "", "", gs)
        for p, s in e.outer.items():
            row(n, "outer", None, p, "", "", s)
        for t in e.tensors:
            row(n, "tensor", t.layer, t.group, t.kind, t.name, t)
    text = buf.getvalue()
    if path is not None:
        Path(path).write_text(text)
    return text


def _num(v):
    return v if isinstance(v, int) else f"{v:.6g}"


# ---------------------------------------------------------------------------- terminal

BLOCKS = " ▁▂▃▄▅▆▇█"


def _bar(v: float, top: float, width: int = 12) -> str:
    if top <= 0 or v <= 0:
        return ""
    n = v / top * width
    return "█" * int(n) + (BLOCKS[int((n - int(n)) * 8)] if int(n) < width else "")


def _f(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(r, k=10, metric="relative") -> str:
    lines = [f"base: {r.base}   ({r.num_layers} layers; metric: {metric}; changed = |Δ| > {r.tol:g})"]
    for n, e in r.experts.items():
        ranks = {layer: i + 1 for i, (layer, _) in enumerate(r.layer_ranking(n, metric))}
        top = max((s.value(metric) for s in e.layers.values()), default=0.0)
        t = e.total
        lines += ["", f"expert {n}: {e.ref}",
                  f"  total: ‖Δ‖ {t.delta_norm:.4g}, relative {_f(t.relative)}, cosine to base {_f(t.cosine, '.6f')}, "
                  f"{_f(t.frac_changed, '.1%')} of entries changed",
                  f"  {'layer':>5} {'rank':>4} {metric:>10} {'attn':>8} {'mlp':>8} {'norm':>8} {'changed':>8}  "]
        for i, s in e.layers.items():
            g = e.layer_groups.get(i, {})
            cells = [_f(g[x].value(metric) if x in g else None) for x in ("attn", "mlp", "norm")]
            lines.append(f"  {i:>5} {ranks[i]:>4} {s.value(metric):>10.4f} {cells[0]:>8} {cells[1]:>8} {cells[2]:>8} "
                         f"{s.frac_changed:>8.1%}  {_bar(s.value(metric), top)}")
        for p, s in e.outer.items():
            lines.append(f"  {p:>10} {s.value(metric):>10.4f} {'':>26} {s.frac_changed:>8.1%}")
        if e.neuron_scores:
            best = r.top_neurons(n, k, per_layer=False)
            lines.append(f"  top {len(best)} MLP neurons (layer:index score): "
                         + ", ".join(f"{x.layer}:{x.index} {x.score:.3g}" for x in best[:12])
                         + (" …" if len(best) > 12 else ""))
        if e.head_scores:
            best = r.top_heads(n, min(k, 8) if isinstance(k, int) else k, per_layer=False)
            lines.append("  top heads (layer:head score): "
                         + ", ".join(f"{x.layer}:{x.index} {x.score:.3g}" for x in best[:8]))
    if r.heads_note and not any(e.head_scores for e in r.experts.values()):
        lines.append(f"\nheads not scored: {r.heads_note}")
    for (a, b), p in r.pairs.items():
        lines += ["", f"task vectors {a} vs {b}: cosine {_f(p['total'].cosine)}, "
                      f"sign agreement {_f(p['total'].sign_agreement, '.1%')}",
                  f"  {'layer':>5} {'cosine':>8} {'signs':>7}"]
        for i, ps in p["layers"].items():
            lines.append(f"  {i:>5} {_f(ps.cosine):>8} {_f(ps.sign_agreement, '.1%'):>7}")
        if any(e.neuron_scores for e in (r.experts[a], r.experts[b])):
            rows = r.neuron_overlap(a, b, k)
            pooled = rows[-1]
            lines.append(f"  top-{k} neuron overlap per layer (|A∩B|/k): "
                         + " ".join(f"{o.layer}:{_f(o.overlap, '.2f')}" for o in rows[:-1]))
            lines.append(f"  all layers: |A∩B| {pooled.intersection} of k {pooled.k}: "
                         f"overlap {_f(pooled.overlap, '.3f')}, "
                         f"Jaccard {_f(pooled.jaccard, '.3f')}")
    return "\n".join(lines)
