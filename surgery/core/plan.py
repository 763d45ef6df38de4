"""Recipe -> Plan: for every output tensor, one op tree over input tensor refs.

    plan = surgery.build_plan("recipe.yaml")
    print(plan.format())          # what `surgery plan` prints
    plan.entries[0].node          # Ref('math', 'model.embed_tokens.weight')

Every tensor starts as a copy of the recipient's. Operations run in recipe order and replace
the trees of the tensors they select, so the last operation that selects a tensor wins.
Layer indices in operations are output layer indices (the recipient's, unless ``stack``
rebuilds the layer list).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Callable

from surgery.io.checkpoint import TensorSource
from surgery.io.safetensors import FLOAT_DTYPES, FLOATING, TensorMeta
from surgery.errors import SurgeryError, did_you_mean
from surgery.core.layout import MODULE_GROUPS, MODULE_KINDS, Layout, TensorInfo
from surgery.core.experts import expert_count, fuse_inputs, parse_experts, stored_notes
from surgery.core.graph import Node, Ref, infer_shape, refs, splice
from surgery.core.virtual import VirtualInput, expand_virtual  # noqa: F401 - VirtualInput: re-exported
from surgery.core.layer_map import check_depths, stack_layers
from surgery.recipe.parsing import parse_layers
from surgery.recipe.schema import Recipe, Select


@dataclass
class Entry:
    """One output tensor."""

    name: str
    info: TensorInfo          # classification of the output name
    source_name: str          # the tensor's name in the inputs (differs when stack remaps layers)
    node: object              # Ref | Node
    dtype: str = ""           # safetensors dtype string of the output
    shape: tuple = ()
    rule: str = "recipient"   # which operation set this tensor, e.g. '#1 layer_swap'
    note: str = ""            # e.g. 'transition' or a score; shown by `surgery plan`
    source_input: str = ""    # input that gives the tensor by default ('' = the recipient; see stack 'from')

    @property
    def description(self) -> str:
        return self.node.describe()

    @property
    def nbytes(self) -> int:
        return TensorMeta(self.dtype, self.shape).nbytes


@dataclass
class Plan:
    recipe: Recipe
    inputs: dict[str, TensorSource]
    layout: Layout
    entries: list[Entry]
    layer_map: list[int]              # output layer -> source layer
    n_source_layers: int
    annotations: list[str] = field(default_factory=list)  # lines shown above the table (selections, scores)
    layer_from: list[str] = field(default_factory=list)      # output layer -> input giving it by default
    selections: list[dict] = field(default_factory=list)     # what operations selected, in full (neuron indices)

    @property
    def recipient(self) -> str:
        return self.recipe.recipient_name

    @property
    def config_source(self) -> str:
        return self.recipe.output.config_from or self.recipient

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def layer_summary(self) -> list[dict]:
        """Per output layer (None = outside layers): which sources, weights and rules built it."""
        from surgery.core.provenance import layer_summary

        return layer_summary(self)

    def format(self, tensors: bool = False) -> str:
        from surgery.core.provenance import format_plan

        return format_plan(self, tensors=tensors)

    def to_dict(self) -> dict:
        return {
            "recipient": self.recipient,
            "num_layers": len(self.layer_map),
            "layer_map": self.layer_map,
            "layers": self.layer_summary(),
            "annotations": self.annotations,
            "selections": self.selections,
            "tensors": [{"name": e.name, "from": e.description, "rule": e.rule, "note": e.note,
                         "dtype": e.dtype, "shape": list(e.shape)} for e in self.entries],
        }


class Context:
    """What a planner sees: the recipe, the inputs and the current assignment of every tensor."""

    def __init__(self, recipe: Recipe, inputs: dict[str, TensorSource], layout: Layout, entries: list[Entry],
                 layer_map: list[int], plan_annotations: list[str], layer_sources: list[dict] | None = None,
                 partial: bool = False):
        self.recipe, self.inputs, self.layout = recipe, inputs, layout
        # partial: the entries are some of the model's tensors (mergekit's per-tensor plugin methods), so a
        # selection that matches none of them is not a user error
        self.partial = partial
        self.entries, self.layer_map = entries, layer_map
        # output layer -> {input: source layer} where a stack segment gives an input other layers
        self.layer_sources = layer_sources or [{} for _ in layer_map]
        self.annotations = plan_annotations
        self.selections: list[dict] = []  # full records of what operations selected (Plan.selections)
        self.skipped: set[str] = set()    # operations whose selection matched nothing and says `missing: skip`
        self.path: tuple = ()
        self.expert_slices: dict[str, list[int]] = {}  # stacked-experts tensor -> the experts the last select chose

    @property
    def n_layers(self) -> int:
        return len(self.layer_map)

    @property
    def recipient(self) -> str:
        return self.recipe.recipient_name

    def ref(self, input_name: str, entry: Entry) -> Ref:
        out_layer = entry.info.layer
        if out_layer is None:
            return Ref(input_name, entry.source_name, None, None)
        default = self.layer_map[out_layer]
        src_layer = self.layer_sources[out_layer].get(input_name, default)
        name = entry.source_name if src_layer == default else self.layout.layer_name(entry.source_name, src_layer)
        return Ref(input_name, name, src_layer, out_layer)

    def error(self, field_path: tuple, message: str) -> SurgeryError:
        return self.recipe.error(self.path + field_path, message)

    @property
    def tag(self) -> str:
        """The current operation as plans show it: '#2 take'."""
        return f"#{self.path[1] + 1} {self.path[2]}"

    def tied_lm_head(self) -> bool:
        """The recipient has no lm_head tensor because its output layer is tied to the embeddings."""
        if any(e.info.kind == "lm_head" for e in self.entries):
            return False
        config = self.inputs[self.recipient].config
        return bool(config.get("tie_word_embeddings", True)) and any(e.info.kind == "embed" for e in self.entries)

    def nothing_selected(self, field_path: tuple, what: str) -> SurgeryError:
        """The error for a selection that matches no tensor (it would be a silent no-op)."""
        if "lm_head" in what and self.tied_lm_head():
            what = ("this model ties lm_head to the embeddings (tie_word_embeddings), so it has no lm_head "
                    "tensor; select the embeddings (modules: [embed]) to change both")
        return self.error(field_path, f"{self.tag} selects no tensor: {what}")

    def layers(self, spec, field_path: tuple) -> list[int]:
        try:
            return parse_layers(spec, self.n_layers)
        except ValueError as e:
            raise self.error(field_path, str(e)) from None

    def select(self, sel: Select | None, field_path: tuple = ("select",)) -> list[Entry]:
        self.expert_slices = {}
        if sel is None:
            return list(self.entries)
        experts = self.experts(sel.experts, field_path + ("experts",)) if sel.experts is not None else None
        every_expert = experts is not None and len(experts) == self.n_experts
        layers = set(self.layers(sel.layers, field_path + ("layers",))) if sel.layers is not None else None
        modules = set(sel.modules or [])
        bad = sorted(modules - set(MODULE_KINDS) - set(MODULE_GROUPS))
        if bad:
            raise self.error(field_path + ("modules",), f"unknown module kind {bad[0]!r}"
                             + did_you_mean(bad[0], MODULE_KINDS + MODULE_GROUPS)
                             + f" (kinds: {', '.join(MODULE_KINDS)}; groups: {', '.join(MODULE_GROUPS)})")
        names = [_name_matcher(p) for p in sel.names or []]
        exclude = [_name_matcher(p) for p in sel.exclude or []]
        strict = not self.partial and sel.missing == "error"
        for i, (pattern, m) in enumerate(zip(sel.names or [], names) if not self.partial else ()):
            if not any(m(e.name) for e in self.entries):
                self.missing(strict, field_path + ("names", i), f"no tensor name matches {pattern!r}")
        for kind in sorted(modules) if not self.partial else ():
            if not any(e.info.kind == kind or e.info.group == kind for e in self.entries):
                self.missing(strict, field_path + ("modules",), f"the model has no {kind!r} tensor")
        out = []
        for e in self.entries:
            i = e.info
            if layers is not None and i.layer not in layers:
                continue
            if modules and i.kind not in modules and i.group not in modules:
                continue
            if names and not any(m(e.name) for m in names):
                continue
            if any(m(e.name) for m in exclude):
                continue
            if experts is not None:
                if i.stacked_experts and not every_expert:
                    self.expert_slices[e.name] = experts  # assign() changes only these experts' slices
                elif i.expert not in experts and not i.stacked_experts:
                    continue
            out.append(e)
        if not out and not self.partial:
            given = ", ".join(f"{k}: {v}" for k, v in sel.model_dump(exclude_defaults=True, exclude={"missing"}).items())
            self.missing(strict, field_path, f"no tensor matches all of {{{given}}}")
            self.skipped.add(self.tag)
        return out

    @property
    def n_experts(self) -> int:
        ck = self.inputs[self.recipient]
        return expert_count(ck.config, [e.source_name for e in self.entries], ck.meta)

    def experts(self, spec: list[int], field_path: tuple) -> list[int]:
        """A selection's expert indices, checked against the model's expert count."""
        count = self.n_experts
        if not count:
            raise self.error(field_path, f"{self.tag} selects experts, but the model has none (no per-expert or "
                                         "stacked expert tensor)")
        index, bad = parse_experts(spec, count)
        if bad is not None:
            raise self.error(field_path + (bad,), f"expert {spec[bad]} is out of range: the model has {count} "
                                                  f"experts per layer (0-{count - 1})")
        return index

    def missing(self, strict: bool, field_path: tuple, what: str) -> None:
        """A selection criterion that matches nothing: an error, or (``missing: skip``) a line of the plan."""
        if strict:
            raise self.nothing_selected(field_path, what)
        if "lm_head" in what and self.tied_lm_head():
            what = "this model ties lm_head to the embeddings (tie_word_embeddings), so it has no lm_head tensor"
        self.annotations.append(f"{self.tag}: skipped, {what} (missing: skip)")

    def assign(self, entry: Entry, node, note: str = "") -> None:
        part = self.expert_slices.get(entry.name)
        if part is not None:  # experts selected in a stacked tensor: the others keep what they had
            node = splice(entry.node, node, 0, part, unit="experts")
        entry.node, entry.note = node, note
        entry.rule = self.tag


def _name_matcher(pattern: str) -> Callable[[str], bool]:
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return lambda n: rx.search(n) is not None
    return lambda n: fnmatch.fnmatchcase(n, pattern)


# ---------------------------------------------------------------------------- building

def make_plan(recipe: Recipe, inputs: dict[str, TensorSource]) -> Plan:
    """Lay out the output tensors, run every operation's planner, then check the result.
    (``surgery.build_plan`` opens the inputs first.)"""
    if recipe.experts == "fused":  # MoE checkpoints read as mergekit reads them (core.experts)
        inputs, notes = fuse_inputs(inputs)
    else:
        notes = stored_notes(inputs[recipe.recipient_name])
    base = inputs[recipe.recipient_name]
    layout = Layout.for_checkpoint(base)
    names = base.keys()
    n_src = layout.num_layers(names, base.config)
    if not recipe.stack:
        check_depths(recipe, inputs, layout, n_src)
    layer_map, layer_from, layer_sources = stack_layers(recipe, inputs, layout, n_src)
    entries = _output_entries(recipe, inputs, layout, layer_map, layer_from)
    annotations: list[str] = notes
    ctx = Context(recipe, inputs, layout, entries, layer_map, annotations, layer_sources)
    for i, op in enumerate(recipe.operations):
        ctx.path = ("operations", i, op.op_name)
        op.plan(ctx)
        if not any(e.rule == ctx.tag for e in entries) and ctx.tag not in ctx.skipped:
            raise ctx.error((), f"{ctx.tag} changes no tensor: nothing it selects is affected by it")
    if any(isinstance(ck, VirtualInput) for ck in inputs.values()):
        for e in entries:
            e.node = expand_virtual(e.node, inputs)
    plan = Plan(recipe, inputs, layout, entries, layer_map, n_src, annotations, layer_from, ctx.selections)
    _check(plan)
    return plan


def _output_entries(recipe, inputs: dict[str, TensorSource], layout: Layout, layer_map: list[int],
                    layer_from: list[str]) -> list[Entry]:
    """Tensors outside layers come from the recipient; each output layer from its stack input."""
    recipient = recipe.recipient_name
    by_layer: dict[str, dict[int, list[tuple[int, str]]]] = {}

    def layer_names(name: str) -> dict[int, list[tuple[int, str]]]:
        if name not in by_layer:
            found: dict[int, list[tuple[int, str]]] = {}
            for idx, n in enumerate(inputs[name].keys()):
                info = layout.info(n)
                if info.layer is not None:
                    found.setdefault(info.layer, []).append((idx, n))
            by_layer[name] = found
        return by_layer[name]

    pre, layers, post = [], [], []
    for idx, name in enumerate(inputs[recipient].keys()):
        info = layout.info(name)
        if info.layer is None:
            entry = Entry(name, info, name, Ref(recipient, name), source_input=recipient)
            (pre if info.kind == "embed" or "embed" in name.lower() else post).append((idx, entry))
    for out_layer, (src, frm) in enumerate(zip(layer_map, layer_from)):
        for idx, name in layer_names(frm).get(src, []):
            out_name = layout.layer_name(name, out_layer)
            layers.append(((out_layer, idx), Entry(out_name, layout.info(out_name), name,
                                                   Ref(frm, name, src, out_layer), source_input=frm,
                                                   rule="recipient" if frm == recipient else f"stack from {frm}")))
    return [e for _, e in sorted(pre, key=lambda t: t[0])] + \
        [e for _, e in sorted(layers, key=lambda t: t[0])] + [e for _, e in sorted(post, key=lambda t: t[0])]


def _check(plan: Plan) -> None:
    """Every ref exists with a matching shape; fill in output dtypes and shapes."""
    recipe, inputs = plan.recipe, plan.inputs
    want = recipe.output.dtype
    for e in plan.entries:
        base = inputs[e.source_input or plan.recipient]
        for r in refs(e.node):
            if r.name not in inputs[r.input]:
                raise recipe.error(("inputs", r.input), f"tensor {r.name!r} is missing in input {r.input!r} "
                                   f"(needed for output tensor {e.name!r}, set by {e.rule})")
        try:
            shape = infer_shape(e.node, lambda r: inputs[r.input].meta[r.name].shape)
        except SurgeryError as ex:
            detail = ", ".join(f"{r.input}: {list(inputs[r.input].meta[r.name].shape)}" for r in refs(e.node))
            raise recipe.error(("inputs",), f"inputs don't line up for tensor {e.source_name!r}: {ex} ({detail})") from None
        expected = base.meta[e.source_name].shape
        reshapes = isinstance(e.node, Node) and e.node.params.get("reshapes")  # e.g. rows re-indexed to a vocabulary
        if shape != expected and not reshapes:
            raise recipe.error(("inputs",), f"inputs don't line up: tensor {e.source_name!r} would have shape "
                               f"{list(shape)} but the {'recipient' if base is inputs[plan.recipient] else 'input'} "
                               f"{e.source_input or plan.recipient!r} has {list(expected)} ({e.rule})")
        e.shape = shape
        stored = base.meta[e.source_name].dtype
        # an op may fix the output dtype of its result (e.g. a mergekit method that returns float32)
        natural = e.node.params.get("out_dtype") if isinstance(e.node, Node) else None
        e.dtype = FLOAT_DTYPES[want] if want and stored in FLOATING else (natural or stored)
