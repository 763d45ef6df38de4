"""surgery operations as mergekit merge methods.

    from surgery.mergekit.methods import register_all
    register_all()                              # adds the surgery_* methods (METHOD_NAMES)

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), "out/", options=MergeOptions())

or from the shell: ``surgery mergekit config.yml out/`` (mergekit's own pipeline, with these
methods registered). See docs/mergekit_plugin.md.

Each method runs surgery's own planner for its operation on the one tensor mergekit hands it
(a one-entry plan) and evaluates the resulting op tree with ``surgery.ops.evaluate``, so
``surgery run`` and mergekit compute the same numbers with the same code. Roles come from
mergekit's usual structure: for ``surgery_layer_swap`` the ``base_model`` is the recipient and
the one other model the donor; for ``surgery_arithmetic`` / ``surgery_blend`` each model has a
``weight`` (negative allowed, references need not be a base). ``surgery_transplant`` (MLP neurons) is
the recipe's ``transplant_neurons`` (or ``reset_neurons`` with ``to: zero``) with explicit indices.

mergekit is imported only inside functions; importing this module is cheap.
"""

# No `from __future__ import annotations` here: mergekit reads the kernels' annotations with
# typing.get_type_hints, and the kernels are defined inside a function.

import functools
from typing import Literal, Optional, Union

from surgery.errors import SurgeryError

METHOD_NAMES = ("surgery_layer_swap", "surgery_arithmetic", "surgery_blend", "surgery_transplant")

RECIPIENT, DONOR = "recipient", "donor"


class MergekitParameterError(SurgeryError, ValueError):
    """A bad parameter of a surgery method inside a mergekit config."""


# ---------------------------------------------------------------------------- registration

def register_all() -> list[str]:
    """Register every surgery merge method with mergekit; safe to call more than once.

    Returns the names of the methods. Raises SurgeryError when another, unrelated method
    already holds one of the names.
    """
    from mergekit import merge_methods

    for method in methods():
        try:
            old = merge_methods.get(method.spec.name)
        except RuntimeError:  # mergekit's "Unimplemented merge method"
            old = None
        if old is None:
            merge_methods.register(method)
        elif not getattr(old, "_surgery_plugin", False):
            raise SurgeryError(f"mergekit already has a different merge method named {method.spec.name!r}; "
                               "cannot register surgery's")
    return list(METHOD_NAMES)


@functools.lru_cache(maxsize=None)
def methods() -> tuple:
    """The surgery merge methods, built once (not registered; see register_all)."""
    return (_layer_swap_method(), _arithmetic_method(normalize=None), _arithmetic_method(normalize=True),
            _transplant_method())


def _finish(method, kind: str):
    """Make parameter errors name the method and parameter; mark the method as ours."""
    import dataclasses

    named = _named_parameter_class()
    params = tuple(named.wrap(p, method.spec.name) for p in method.spec.parameters)
    method.spec = dataclasses.replace(method.spec, parameters=params)
    method._surgery_plugin = True
    method._surgery_operation = kind
    return method


@functools.lru_cache(maxsize=None)
def _named_parameter_class():
    import dataclasses

    from mergekit.merge_methods.base import ParameterSpec
    from pydantic import ValidationError

    @dataclasses.dataclass(frozen=True)
    class NamedParameter(ParameterSpec):
        method: str = ""

        @classmethod
        def wrap(cls, p, method: str):
            return cls(name=p.name, value_type=p.value_type, scope=p.scope, default=p.default,
                       description=p.description, batch_tensor=p.batch_tensor, method=method)

        def validate(self, value):
            try:
                return super().validate(value)
            except ValidationError as e:
                err = e.errors()[0]
                hint = _PARAMETER_HINTS.get((self.method, self.name), "")
                raise MergekitParameterError(f"{self.method}: parameter {self.name!r}: {err['msg']} "
                                             f"(got {value!r}){hint}") from None

    return NamedParameter


_LAYERS_HINT = (". Give layers as a string like '0-3, 28-31'; a YAML list is a mergekit gradient, "
                "interpolated across layers")
_SOURCE_HINT = ": 'recipient', 'donor', or the donor's weight in a blend (0 to 1)"
_PARAMETER_HINTS = {("surgery_layer_swap", "layers"): _LAYERS_HINT,
                    **{("surgery_layer_swap", k): _SOURCE_HINT for k in ("embeddings", "final_norm", "lm_head")}}


# ---------------------------------------------------------------------------- the methods

def _layer_swap_method():
    import torch
    from mergekit.merge_methods.base import BasePolicy, InputContract, TensorGroup
    from mergekit.merge_methods.easy_define import merge_method
    from pydantic import Field
    from typing_extensions import Annotated

    Count = Annotated[int, Field(ge=0)]
    Source = Union[Literal["recipient", "donor"], float]

    @merge_method(name="surgery_layer_swap", pretty_name="surgery layer swap (Bandarkar et al. 2024)",
                  reference_url="https://arxiv.org/abs/2410.01335", uses_accelerator=False,
                  contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1, max_non_base=1))
    def surgery_layer_swap(group: TensorGroup, bottom: Count = 0, top: Count = 0, layers: Optional[str] = None,
                           transition: Count = 0, num_layers: Optional[Annotated[int, Field(gt=0)]] = None,
                           embeddings: Source = "recipient", final_norm: Source = "recipient",
                           lm_head: Source = "recipient") -> torch.Tensor:
        from surgery.operations.basic import LayerSwap

        fields = dict(bottom=bottom, top=top, layers=layers, transition=transition, embeddings=embeddings,
                      final_norm=final_norm, lm_head=lm_head)
        op = _build_op(LayerSwap, "surgery_layer_swap", donor=DONOR, **{k: v for k, v in fields.items()
                                                                      if v is not None})
        recipient, donor = group.base, group.non_base[0]
        tensors = {RECIPIENT: recipient.tensor, DONOR: donor.tensor}
        return _apply("layer_swap", op, "surgery_layer_swap", group, tensors, recipient.id, num_layers)

    return _finish(surgery_layer_swap, "layer_swap")


def _arithmetic_method(normalize):
    import torch
    from mergekit.merge_methods.base import InputContract, PerInput, TensorGroup
    from mergekit.merge_methods.easy_define import merge_method

    if normalize is None:
        @merge_method(name="surgery_arithmetic", pretty_name="surgery arithmetic (weighted sum, any signs)",
                      uses_accelerator=False, contract=InputContract(min_inputs=1))
        def surgery_arithmetic(group: TensorGroup, weight: PerInput[float]) -> torch.Tensor:
            return _weighted(group, weight, "surgery_arithmetic", normalize=False)

        return _finish(surgery_arithmetic, "arithmetic")

    @merge_method(name="surgery_blend", pretty_name="surgery blend (weighted average)", uses_accelerator=False,
                  contract=InputContract(min_inputs=1))
    def surgery_blend(group: TensorGroup, weight: PerInput[float], normalize: bool = True) -> torch.Tensor:
        return _weighted(group, weight, "surgery_blend", normalize=normalize)

    return _finish(surgery_blend, "blend")


def _weighted(group, weight, method: str, normalize: bool):
    """surgery_arithmetic: the `arithmetic` planner on 'w0*m0 + w1*m1 + ...'; surgery_blend: `blend`."""
    from surgery.operations.basic import Arithmetic, Blend

    roles = [f"m{i}" for i in range(len(group.entries))]
    tensors = {r: e.tensor for r, e in zip(roles, group.entries)}
    weights = {r: float(weight[e.id]) for r, e in zip(roles, group.entries)}
    if method == "surgery_arithmetic":
        if all(w == 0.0 for w in weights.values()):
            raise MergekitParameterError(f"{method}: every weight is 0 for tensor {group.metadata.name!r}")
        expr = " + ".join(f"({w!r})*{r}" for r, w in weights.items())
        op, kind = _build_op(Arithmetic, method, expr=expr), "arithmetic"
    else:
        op, kind = _build_op(Blend, method, weights=weights, normalize=normalize), "blend"
    return _apply(kind, op, method, group, tensors, group.entries[0].id, None, roles=roles)


def _transplant_method():
    import torch
    from mergekit.merge_methods.base import BasePolicy, InputContract, TensorGroup
    from mergekit.merge_methods.easy_define import merge_method
    from pydantic import Field
    from typing_extensions import Annotated

    @merge_method(name="surgery_transplant", pretty_name="surgery neuron transplant / zeroing",
                  uses_accelerator=False, contract=InputContract(base=BasePolicy.REQUIRED, max_non_base=1))
    def surgery_transplant(group: TensorGroup, neurons: str, layers: Optional[str] = None,
                           mode: Literal["transplant", "zero"] = "transplant",
                           num_layers: Optional[Annotated[int, Field(gt=0)]] = None) -> torch.Tensor:
        return _transplant(group, neurons, layers, mode, num_layers)

    return _finish(surgery_transplant, "transplant")


def _transplant(group, neurons: str, layers, mode: str, num_layers):
    """The recipe's ``transplant_neurons`` (donor -> recipient) or ``reset_neurons`` (to: zero) with
    explicit neuron indices, planned and evaluated like the other methods (the ``splice`` op)."""
    from surgery.analysis.neuron_set import MLP_KINDS

    method = "surgery_transplant"
    name = group.metadata.name
    if not name:
        raise MergekitParameterError(f"{method} needs the tensor name (TensorGroup.metadata.name) to place it")
    recipient = group.base.tensor
    donors = group.non_base
    if mode == "transplant" and not donors:
        raise MergekitParameterError(f"{method}: mode 'transplant' needs a donor: one model besides base_model "
                                     "(to reset neurons to a base, make that base the donor)")
    if mode == "zero" and donors:
        raise MergekitParameterError(f"{method}: mode 'zero' takes no donor; list only base_model")
    layout, model_layers = _model_layout(group.base.id)
    sets = _neuron_sets(neurons, layers, num_layers or model_layers)
    info = layout.info(name)
    # a one-tensor plan: tensors the neuron set leaves alone are the recipient's (the planner would
    # refuse a plan in which no MLP tensor changes)
    if info.layer is None or info.kind not in MLP_KINDS or (info.layer not in sets and "*" not in sets):
        return recipient
    kind, op = _transplant_op(neurons, layers, num_layers or model_layers, mode)
    tensors = {RECIPIENT: recipient, **({DONOR: donors[0].tensor} if donors else {})}
    return _apply(kind, op, method, group, tensors, group.base.id, num_layers)


@functools.lru_cache(maxsize=64)
def _transplant_op(neurons: str, layers: Optional[str], n: int, mode: str) -> tuple:
    """(planner name, TransplantNeurons / ResetNeurons) with the parameters' neurons as explicit indices."""
    from surgery.operations.neurons import ResetNeurons, TransplantNeurons

    sets = _neuron_sets(neurons, layers, n)
    indices = sets["*"] if "*" in sets else sets
    if mode == "zero":
        return "reset_neurons", _build_op(ResetNeurons, "surgery_transplant", to="zero", neurons={"indices": indices})
    return "transplant_neurons", _build_op(TransplantNeurons, "surgery_transplant", donor=DONOR,
                                           neurons={"indices": indices})


@functools.lru_cache(maxsize=256)
def _neuron_sets(neurons: str, layers: Optional[str], n: int) -> dict:
    """'3, 17, 40-45' (every layer, or those in ``layers``) or '4: 3,17; 6-7: 0-9' -> {layer: [neurons]}."""
    import re

    from surgery.recipe.parsing import parse_layers

    method = "surgery_transplant"

    def layer_list(spec: str, field: str) -> list:
        if not n:
            raise MergekitParameterError(f"{method}: cannot tell the number of layers; set parameter 'num_layers'")
        try:
            return parse_layers(spec, n)
        except ValueError as e:
            raise MergekitParameterError(f"{method}: parameter {field!r}: {e}") from None

    def neuron_list(spec: str) -> list:
        out = []
        for part in (p.strip() for p in spec.split(",")):
            m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
            if not m or (m[2] is not None and int(m[2]) < int(m[1])):
                raise MergekitParameterError(f"{method}: parameter 'neurons': expected neuron indices like "
                                             f"'3, 17, 40-45', optionally per layer '4: 3,17; 6: 0-9'; got {part!r}")
            for j in range(int(m[1]), int(m[2] or m[1]) + 1):
                if j not in out:
                    out.append(j)
        return out

    if ":" not in neurons:
        if layers is None:
            return {"*": neuron_list(neurons)}  # every layer
        return {layer: neuron_list(neurons) for layer in layer_list(layers, "layers")}
    if layers is not None:
        raise MergekitParameterError(f"{method}: give either per-layer 'neurons' ('4: 3,17') or 'layers', not both")
    sets: dict = {}
    for chunk in (c.strip() for c in neurons.split(";") if c.strip()):
        where, _, which = chunk.partition(":")
        for layer in layer_list(where.strip(), "neurons"):
            sets.setdefault(layer, [])
            sets[layer] += [j for j in neuron_list(which) if j not in sets[layer]]
    return sets


# ---------------------------------------------------------------------------- one-tensor plans

def _build_op(model, method: str, **fields):
    """The surgery operation model, validated like a recipe's (constraints included)."""
    from pydantic import ValidationError

    try:
        return model.model_validate(fields)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("literal", "float", "int", "str")))
        raise MergekitParameterError(f"{method}: parameter {loc!r}: {err['msg']} (got {err.get('input')!r})") \
            from None


def _apply(kind: str, op, method: str, group, tensors: dict, layout_source, num_layers: Optional[int],
           roles: Optional[list] = None):
    """Plan ``op`` for the group's one tensor with surgery's planner, then evaluate its op tree."""
    from surgery.errors import RecipeError
    from surgery.core.graph import Ref, evaluate
    from surgery.core.plan import Context, Entry
    from surgery.recipe.schema import Recipe

    name = group.metadata.name
    if not name:
        raise MergekitParameterError(f"{method} needs the tensor name (TensorGroup.metadata.name) to place it")
    layout, model_layers = _model_layout(layout_source)
    n = num_layers or model_layers
    info = layout.info(name)
    if info.layer is not None and kind != "layer_swap":
        n = max(n, info.layer + 1)  # the layer count matters only to layer_swap
    elif info.layer is not None:
        if not n:
            raise MergekitParameterError(f"{method}: cannot tell the number of layers; set parameter 'num_layers'")
        if info.layer >= n:
            raise MergekitParameterError(f"{method}: tensor {name!r} is in layer {info.layer} but the model has "
                                         f"{n} layers; set parameter 'num_layers' to the output's layer count")
    inputs = {RECIPIENT: "-", DONOR: "-"} if roles is None else {r: "-" for r in roles}
    recipient = RECIPIENT if roles is None else roles[0]
    recipe = Recipe.model_validate({"inputs": inputs, "recipient": recipient})
    entry = Entry(name, info, name, Ref(recipient, name, info.layer, info.layer))
    # the inputs as planners see them: each role's one tensor, metadata only
    inputs = {role: _OneTensor(name, t) for role, t in tensors.items()}
    ctx = Context(recipe, inputs, layout, [entry], list(range(n or 0)), [], partial=True)
    ctx.path = ("operations", 0, kind)
    try:
        op.plan(ctx)
    except RecipeError as e:
        field = str(e.path[3]) if len(e.path) > 3 else ""  # ('operations', 0, kind, field, ...)
        field = {"weights": "weight", "expr": "weight"}.get(field, field)  # recipe field -> mergekit parameter
        where = f"parameter {field!r}" if field else "parameters"
        raise MergekitParameterError(f"{method}: {where}: {e.message}") from None
    dtype = group.entries[0].tensor.dtype
    out = evaluate(entry.node, lambda ref: tensors[ref.input])
    return out if out.dtype == dtype else out.to(dtype)


class _OneTensor:
    """Stands in for a Checkpoint in a one-tensor plan: ``meta[name].shape`` of the tensor."""

    def __init__(self, name: str, tensor):
        from types import SimpleNamespace

        self.meta = {name: SimpleNamespace(shape=tuple(tensor.shape))}

    def __contains__(self, name) -> bool:
        return name in self.meta


@functools.lru_cache(maxsize=64)
def _model_layout(source) -> tuple:
    """(Layout, layer count) of a mergekit ModelReference; a generic layout for other ids."""
    from surgery.core.layout import Layout

    model = getattr(source, "model", None)
    path = getattr(model, "path", None)
    if path is None:
        return Layout(None), 0
    from surgery.io.checkpoint import Checkpoint

    ref = f"{path}@{model.revision}" if getattr(model, "revision", None) else str(path)
    ck = Checkpoint.open(ref)
    layout = Layout.for_checkpoint(ck)
    return layout, layout.num_layers(ck.keys(), ck.config)


# ---------------------------------------------------------------------------- running mergekit
