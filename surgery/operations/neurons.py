"""Recipe operations that select from an analysis: ranked layer swap, neuron transplant, neuron reset.

    - ranked_layer_swap: {donor: sw, k: 4}                         # the 4 layers sw changed most
    - ranked_layer_swap: {donor: sw, reference: base, k: 4, split: outer}
    - transplant_neurons: {donor: sw, neurons: {base: base, top: 0.01}}
    - reset_neurons: {to: base, neurons: {expert: sw, top: 50}}     # or to: zero (masking)
    - reset_neurons: {to: zero, neurons: {file: lape_neurons.json}}

The analysis is the same streaming ``surgery.analysis.diff`` that `surgery diff` runs, restricted
to the tensors the operation needs; what it selected, with the scores, is shown by `surgery plan`.
Neuron indices are layer-local and refer to the inputs' (source) layers. Neuron-set JSON format:
docs/analysis.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, field_validator

from surgery.analysis.neuron_set import MLP_KINDS, NEURON_FORMAT, load_neuron_set
from surgery.core.graph import splice
from surgery.errors import SurgeryError
from surgery.operations.basic import LayerSwap
from surgery.recipe.parsing import LayerSpec
from surgery.recipe.schema import Operation, Source, Strict

Metric = Literal["relative", "delta_norm", "mean_abs", "max_abs", "frac_changed"]


# ---------------------------------------------------------------------------- schema

def _check_top(v):
    if v is None:
        return v
    if isinstance(v, bool) or v <= 0 or (isinstance(v, float) and v >= 1 and not v.is_integer()):
        raise ValueError(f"top must be a count >= 1 or a fraction between 0 and 1, got {v!r}")
    return int(v) if isinstance(v, float) and v.is_integer() else v


NeuronIndex = Annotated[int, Field(ge=0)]


class NeuronSet(Strict):
    """MLP neurons: the top-ranked by change of `expert` relative to `base`, a set read from `file`,
    or explicit `indices`."""

    expert: str | None = Field(None, description=(
        "Input whose change ranks the neurons. Default: the donor (transplant_neurons) or the recipient "
        "(reset_neurons)."))
    base: str | None = Field(None, description=(
        "Input the change is measured against. Default: the recipient (transplant_neurons) or `to` (reset_neurons)."))
    top: Union[int, float, None] = Field(None, description="How many: a count per layer (50) or a fraction (0.01).")
    per_layer: bool = Field(True, description="Top-k within each layer (true) or over all layers together (false).")
    layers: LayerSpec | None = Field(None, description="Only these (source) layers.")
    file: str | None = Field(None, description=(
        "Neuron-set JSON file (format surgery.neurons/1) instead of a ranking; relative to the recipe."))
    indices: Union[list[NeuronIndex], dict[int, list[NeuronIndex]], None] = Field(None, description=(
        "Explicit neurons instead of a ranking: a list for every layer (or those in `layers`), or {layer: [indices]}."))

    @field_validator("top")
    @classmethod
    def _valid_top(cls, v):
        return _check_top(v)

    def refs(self) -> list[str]:
        return [n for n in (self.expert, self.base) if n]


class RankedLayerSwap(Operation):
    """A layer swap whose layers are the k the donor changed most, relative to a reference."""

    op_name: ClassVar[str] = "ranked_layer_swap"

    donor: str = Field(description="Input that gives the swapped layers.")
    reference: str | None = Field(None, description=(
        "Input the donor's change is measured against. Default: the recipient."))
    k: int = Field(ge=1, description="Number of layers to swap.")
    split: Literal["any", "outer"] = Field("any", description=(
        "any: the k top-ranked layers wherever they are; outer: the bottom/top split (b bottom + k-b top layers) with "
        "the largest total score."))
    metric: Metric = Field("relative", description=(
        "Layer score: relative (‖Δ‖/‖W‖), delta_norm, mean_abs, max_abs or frac_changed."))
    transition: int = Field(0, ge=0, description="As in layer_swap.")
    embeddings: Source = Field("recipient", description="As in layer_swap.")
    final_norm: Source = Field("recipient", description="As in layer_swap.")
    lm_head: Source = Field("recipient", description="As in layer_swap.")

    def input_refs(self):
        return {"donor": [self.donor], "reference": [self.reference] if self.reference else []}

    def plan(self, ctx) -> None:
        _plan_ranked_layer_swap(ctx, self)


class TransplantNeurons(Operation):
    """Copy the selected MLP neurons (rows of gate/up, columns of down) from a donor into the recipient."""

    op_name: ClassVar[str] = "transplant_neurons"

    donor: str = Field(description="Input the neurons come from.")
    neurons: NeuronSet = Field(description="Which neurons.")

    def input_refs(self):
        return {"donor": [self.donor], "neurons": self.neurons.refs()}

    def plan(self, ctx) -> None:
        _plan_transplant_neurons(ctx, self)


class ResetNeurons(Operation):
    """Set the selected MLP neurons of the recipient to another input's values (e.g. the base), or to zero."""

    op_name: ClassVar[str] = "reset_neurons"

    to: str = Field(description="Input name whose values the neurons get, or 'zero' (masking).")
    neurons: NeuronSet = Field(description="Which neurons.")

    def input_refs(self):
        return {"to": [] if self.to == "zero" else [self.to], "neurons": self.neurons.refs()}

    def plan(self, ctx) -> None:
        _plan_reset_neurons(ctx, self)

# ---------------------------------------------------------------------------- planners


def _cached_diff(ctx, base: str, expert: str, what: str):
    from surgery.analysis.diff import diff

    cache = ctx.__dict__.setdefault("_diff_cache", {})
    key = (base, expert, what)
    if key not in cache:
        include = (lambda i: i.layer is not None) if what == "layers" else \
                  (lambda i: i.layer is not None and i.kind in MLP_KINDS)
        cache[key] = diff(ctx.inputs[base], {expert: ctx.inputs[expert]}, neurons=what == "neurons",
                          heads=False, pairs=False, include=include, layout=ctx.layout)
    return cache[key]


def _identity_layers(ctx, opname: str):
    if ctx.layer_map != list(range(len(ctx.layer_map))):
        raise ctx.error((), f"{opname} ranks the inputs' layers and cannot follow a 'stack' that reorders them")


def _plan_ranked_layer_swap(ctx, op: RankedLayerSwap) -> None:
    _identity_layers(ctx, "ranked_layer_swap")
    n = ctx.n_layers
    if op.k > n:
        raise ctx.error(("k",), f"k = {op.k} exceeds the model's {n} layers")
    ref = op.reference or ctx.recipient
    if ref == op.donor:
        raise ctx.error(("reference",), f"the donor {op.donor!r} is also the reference; nothing would rank")
    ranking = _cached_diff(ctx, ref, op.donor, "layers").layer_ranking(op.donor, op.metric)
    score = dict(ranking)
    if op.split == "any":
        chosen = sorted(i for i, _ in ranking[:op.k])
        swap = LayerSwap(donor=op.donor, layers=chosen, transition=op.transition, embeddings=op.embeddings,
                         final_norm=op.final_norm, lm_head=op.lm_head)
        how = f"the {op.k} top-ranked layers"
    else:
        def total(b):
            return sum(score.get(i, 0.0) for i in list(range(b)) + list(range(n - (op.k - b), n)))
        b = max(range(op.k + 1), key=lambda b: (total(b), -abs(2 * b - op.k)))
        chosen = list(range(b)) + list(range(n - (op.k - b), n))
        swap = LayerSwap(donor=op.donor, bottom=b, top=op.k - b, transition=op.transition,
                         embeddings=op.embeddings, final_norm=op.final_norm, lm_head=op.lm_head)
        how = f"outer split bottom {b} + top {op.k - b} (total score {total(b):.4g})"
    rank = {i: r + 1 for r, (i, _) in enumerate(ranking)}
    ctx.annotations.append(f"{_tag(ctx)}: {op.donor} vs {ref} by {op.metric}, {how}: layers "
                           + ", ".join(map(str, chosen)))
    ctx.annotations.append("    ranking: " + ", ".join(f"L{i} {s:.4g}" for i, s in ranking))
    swap.plan(ctx)
    for e in ctx.entries:
        if e.info.layer in rank and e.rule == _tag(ctx) and e.note:
            e.note = f"{e.note}, rank {rank[e.info.layer]} {op.metric} {score[e.info.layer]:.4g}"


def _tag(ctx) -> str:
    return ctx.tag


def _select_neurons(ctx, ns: NeuronSet, default_expert: str | None, default_base: str | None):
    """{source layer: [(index, score)]} and a description of where it came from."""
    if ns.indices is not None:
        if ns.file or ns.top is not None or ns.expert or ns.base:
            raise ctx.error(("neurons", "indices"), "give either 'indices', 'file' or a ranking "
                                                    "('expert'/'base'/'top'), not two of them")
        if isinstance(ns.indices, dict):
            sel = {i: [(j, None) for j in dict.fromkeys(v)] for i, v in ns.indices.items()}
        else:
            sel = {i: [(j, None) for j in dict.fromkeys(ns.indices)] for i in range(ctx.n_layers)}
        src = "explicit indices"
    elif ns.file:
        if ns.top is not None or ns.expert or ns.base:
            raise ctx.error(("neurons", "file"), "give either 'file' or a ranking ('expert'/'base'/'top'), not both")
        base_dir = ctx.recipe.base_dir or Path.cwd()
        path = Path(ns.file) if Path(ns.file).is_absolute() else base_dir / ns.file
        try:
            sel = load_neuron_set(path)
        except SurgeryError as e:
            raise ctx.error(("neurons", "file"), str(e)) from None
        src = f"file {ns.file}"
    else:
        expert, base = ns.expert or default_expert, ns.base or default_base
        if ns.top is None:
            raise ctx.error(("neurons",), "say which neurons: 'top' (a count or fraction) or 'file' "
                                          "(or explicit 'indices')")
        if not expert or not base:
            raise ctx.error(("neurons",), "say whose change ranks the neurons: 'expert' and 'base'")
        if expert == base:
            raise ctx.error(("neurons", "base"), f"expert and base are both {expert!r}; nothing would rank")
        result = _cached_diff(ctx, base, expert, "neurons")
        if not result.expert(expert).neuron_scores:
            raise ctx.error(("neurons",), "no MLP neuron tensors found in this architecture's layout")
        sel = {}
        for x in result.top_neurons(expert, ns.top, ns.per_layer):
            sel.setdefault(x.layer, []).append((x.index, x.score))
        scope = "per layer" if ns.per_layer else "over all layers"
        src = f"top {ns.top} {scope} of {expert} vs {base} by ‖Δ‖"
    if ns.layers is not None:
        keep = set(ctx.layers(ns.layers, ("neurons", "layers")))
        sel = {i: v for i, v in sel.items() if i in keep}
    bad = sorted(i for i in sel if not 0 <= i < ctx.n_layers)
    if bad:
        raise ctx.error(("neurons",), f"neuron set names layer {bad[0]}, but the model has {ctx.n_layers} layers")
    sel = {i: v for i, v in sorted(sel.items()) if v}
    if not sel:
        raise ctx.error(("neurons",), f"the neuron set is empty ({src})")
    return sel, src


def _apply_neurons(ctx, sel, src_name: str | None, what: str, src_desc: str) -> None:
    recipient = ctx.inputs[ctx.recipient]
    touched = 0
    for e in ctx.entries:
        i = e.info
        if i.layer is None or i.kind not in MLP_KINDS or i.neuron_axis is None:
            continue
        picked = sel.get(ctx.layer_map[i.layer])
        if not picked:
            continue
        size = recipient.meta[e.source_name].shape[i.neuron_axis]
        n_neurons = size // 2 if i.kind == "mlp_gate_up" else size
        idx = [j for j, _ in picked]
        if max(idx) >= n_neurons:
            raise ctx.error(("neurons",), f"neuron {max(idx)} is out of range in layer {ctx.layer_map[i.layer]}: "
                                          f"{e.source_name!r} has {n_neurons} neurons (0-{n_neurons - 1})")
        if i.kind == "mlp_gate_up":
            idx = idx + [j + n_neurons for j in idx]
        donor = ctx.ref(src_name, e) if src_name else None
        ctx.assign(e, splice(e.node, donor, i.neuron_axis, idx), f"{len(picked)} neurons {what}")
        touched += 1
    if not touched:
        raise ctx.error(("neurons",), "no MLP tensors of the selected layers were found to change")
    total = sum(len(v) for v in sel.values())
    ctx.annotations.append(f"{_tag(ctx)}: {total} neurons in {len(sel)} layers {what} ({src_desc})")
    # the full record (plan --json, the manifest): every index, so the operation can be reproduced from it
    # in the neuron-set file format, so that the record itself can be given back as `neurons: {file: ...}`
    ctx.selections.append({"format": NEURON_FORMAT, "operation": _tag(ctx), "action": what, "source": src_desc,
                           "neurons": {str(layer): [j for j, _ in picked] for layer, picked in sel.items()},
                           "scores": {str(layer): [s for _, s in picked] for layer, picked in sel.items()
                                      if any(s is not None for _, s in picked)}})
    for layer, picked in sel.items():
        shown = ", ".join(f"{j}" + (f" ({s:.3g})" if s is not None else "") for j, s in picked[:8])
        ctx.annotations.append(f"    L{layer}: {shown}" + (f" … (+{len(picked) - 8})" if len(picked) > 8 else ""))


def _plan_transplant_neurons(ctx, op: TransplantNeurons) -> None:
    if op.donor == ctx.recipient:
        raise ctx.error(("donor",), f"the donor {op.donor!r} is the recipient; transplanting would change nothing")
    sel, desc = _select_neurons(ctx, op.neurons, op.donor, ctx.recipient)
    _apply_neurons(ctx, sel, op.donor, f"from {op.donor}", desc)


def _plan_reset_neurons(ctx, op: ResetNeurons) -> None:
    to = None if op.to == "zero" else op.to
    sel, desc = _select_neurons(ctx, op.neurons, ctx.recipient, to)
    _apply_neurons(ctx, sel, to, "zeroed" if to is None else f"reset to {to}", desc)
