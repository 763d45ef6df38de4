"""Human-readable views of a plan: per-layer provenance and the `surgery plan` table."""

from __future__ import annotations

from collections import OrderedDict

from surgery.core.experts import format_experts
from surgery.io.output import format_size


def _groups(entries) -> "OrderedDict[tuple[str, str, str], list[str]]":
    """(description, rule, note) -> module kinds, in first-seen order. Expert tensors are labelled by
    their experts instead: 'experts 0,3' (one tensor per expert), 'experts' (all of them stacked)."""
    groups: OrderedDict = OrderedDict()
    experts: dict = {}
    for e in entries:
        key = (e.description, e.rule, e.note)
        kinds = groups.setdefault(key, [])
        label = "experts" if e.info.stacked_experts or e.info.expert is not None else e.info.kind
        if e.info.expert is not None:
            experts.setdefault(key, set()).add(e.info.expert)
        if label not in kinds:
            kinds.append(label)
    for key, index in experts.items():
        groups[key] = [f"experts {format_experts(index)}" if k == "experts" else k for k in groups[key]]
    return groups


def _by_group(kinds: list[str], entries) -> list[str]:
    """Name a whole module group (attn, mlp, ...) instead of listing every kind in it."""
    present: dict[str, set] = {}
    for e in entries:
        if e.info.stacked_experts or e.info.expert is not None:
            continue
        present.setdefault(e.info.group, set()).add(e.info.kind)
    out = []
    for k in kinds:
        if k.startswith("experts"):
            out.append(k)
            continue
        group = next(e.info.group for e in entries if e.info.kind == k)
        label = group if present[group] <= set(kinds) else k
        if label not in out:
            out.append(label)
    return out


def layer_summary(plan) -> list[dict]:
    """One row per output layer plus rows for tensors outside layers ('layer': null)."""
    by_layer: OrderedDict = OrderedDict()
    seen_layer = False
    for e in plan.entries:
        seen_layer = seen_layer or e.info.layer is not None
        key = e.info.layer if e.info.layer is not None else ("after" if seen_layer else "before")
        by_layer.setdefault(key, []).append(e)
    rows = []
    for key, entries in by_layer.items():
        groups = _groups(entries)
        groups = OrderedDict((k, _by_group(kinds, entries)) for k, kinds in groups.items())
        layer = key if isinstance(key, int) else None
        rows.append({
            "layer": layer,
            "position": "layer" if layer is not None else f"{key}_layers",
            "source_layer": plan.layer_map[layer] if layer is not None else None,
            "tensors": len(entries),
            "sources": [{"from": d, "rule": r, "note": n, "modules": "all" if len(groups) == 1 else kinds}
                        for (d, r, n), kinds in groups.items()],
        })
    return rows


def format_plan(plan, tensors: bool = False) -> str:
    lines = []
    recipe = plan.recipe
    lines.append(f"recipe: {recipe.source or '<in memory>'}")
    for name, ck in plan.inputs.items():
        tag = "  (recipient)" if name == plan.recipient else ""
        lines.append(f"  input {name:<12} {ck.ref}{tag}")
    n_out = len(plan.layer_map)
    lines.append(f"output: {len(plan.entries)} tensors, {format_size(plan.total_bytes)}, {n_out} layers"
                 + (f" (from {plan.n_source_layers})" if n_out != plan.n_source_layers else "")
                 + f", dtype {recipe.output.dtype or 'as recipient'}, config from {plan.config_source}")
    lines += [f"  {a}" for a in plan.annotations]
    lines.append("")
    if tensors:
        width = max(len(e.name) for e in plan.entries)
        for e in plan.entries:
            lines.append(f"{e.name:<{width}}  ← {e.description:<28} {e.rule}"
                         + (f" ({e.note})" if e.note else ""))
        return "\n".join(lines)
    rows = layer_summary(plan)
    rendered = []
    for row in rows:
        label = {"before_layers": "before layers", "after_layers": "after layers"}.get(row["position"],
                                                                                        f"layer {row['layer']}")
        if row["layer"] is not None and row["source_layer"] != row["layer"]:
            label += f" (src {row['source_layer']})"
        body = []
        for s in row["sources"]:
            mods = "all" if s["modules"] == "all" else ",".join(s["modules"])
            extra = f"{s['rule']}" + (f", {s['note']}" if s["note"] else "")
            body.append(f"{mods:<22} ← {s['from']:<30} [{extra}]")
        rendered.append((row["layer"], label, body))
    # merge consecutive layers whose bodies are identical
    merged = []
    for layer, label, body in rendered:
        if merged and layer is not None and merged[-1][0] is not None and merged[-1][3] == body \
                and merged[-1][2] == layer - 1 and "src" not in label:
            first, _, _, _ = merged[-1]
            merged[-1] = (first, f"layers {first}-{layer}", layer, body)
        else:
            merged.append((layer, label, layer, body))
    width = max(len(m[1]) for m in merged)
    for _, label, _, body in merged:
        for i, b in enumerate(body):
            lines.append(f"{label if i == 0 else '':<{width}}  {b}")
    return "\n".join(lines)
