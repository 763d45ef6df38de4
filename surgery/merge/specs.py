"""The parameter specs of mergekit's merge methods, as the planner reads them.

``spec_of(name)`` returns a ``Spec``: the method's parameters (name, type, scope, default) and its
input contract. For the methods surgery computes itself without torch (``linear``,
``task_arithmetic`` and ``ties``: their host backends), the spec is written out here, so planning and running
such a merge never imports mergekit (whose registry imports torch: ~2.5 CPU-s, more than the merge of a
0.5 GB model). Every other method's spec is read from mergekit's registry. tests/merge/test_host_backends.py
compares the written-out specs field by field, and their input checks message by message, with
mergekit's registry, so a mergekit release that changes them fails the tests instead of drifting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from surgery.errors import did_you_mean

REQUIRED = object()  # the default of a parameter that has none (mergekit: MISSING)


@dataclass(frozen=True)
class Param:
    name: str
    value_type: Any
    scope: str                 # "shared", "input" or "non_base" (mergekit's ParameterScope values)
    default: Any = REQUIRED
    _adapter: Any = field(default=None, compare=False, repr=False)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def validate(self, value):
        """pydantic's lax validation of the value type, as mergekit's ParameterSpec.validate."""
        if self._adapter is None:
            from pydantic import TypeAdapter

            object.__setattr__(self, "_adapter", TypeAdapter(self.value_type))
        return self._adapter.validate_python(value)


@dataclass(frozen=True)
class Spec:
    name: str
    parameters: tuple[Param, ...]
    base: str                  # "ignored", "required", "optional" or "forbidden" (mergekit's BasePolicy values)
    validate_inputs: Callable[[list, Any], None]
    mergekit: bool = True      # False: a method of surgery's own (no mergekit kernel to fall back on)
    base_methods: tuple[str, ...] = ()  # a wrapper method: the values its ``base_method`` may take
    own: tuple[str, ...] = ()  # a wrapper's own parameters; the others pass through to its base method

    @property
    def shared(self) -> list[Param]:
        return [p for p in self.parameters if p.scope == "shared"]

    @property
    def per_input(self) -> list[Param]:
        return [p for p in self.parameters if p.scope != "shared"]


def _contract(base_policy: str):
    """mergekit's InputContract.validate_ids for a contract of at least one input and no other bounds."""
    def validate(input_ids: list, base_id) -> None:
        if any(i is None for i in input_ids):
            raise ValueError("Merge input IDs cannot be None")
        if len(set(input_ids)) != len(input_ids):
            raise ValueError("Duplicate merge inputs")
        if base_policy == "ignored":
            base_id = None
        has_base = base_id is not None and base_id in input_ids
        if base_id is not None and not has_base:
            raise ValueError("Base input is not present in merge inputs")
        if base_policy == "required" and not has_base:
            raise ValueError("Merge method requires a base input")
        if base_policy == "forbidden" and has_base:
            raise ValueError("Merge method does not accept a base input")
        if len(input_ids) < 1:
            raise ValueError(f"Merge method requires at least 1 inputs; got {len(input_ids)}")
    return validate


def _task_arithmetic_params(normalize: bool) -> tuple[Param, ...]:
    return (Param("int8_mask", bool, "shared", False), Param("normalize", bool, "shared", normalize),
            Param("rescale", bool, "shared", False), Param("lambda", float, "shared", 1.0),
            Param("weight", float, "non_base"), Param("density", float, "non_base", 1.0))


_GTA = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
        "della_linear")
# the pass-through parameters that only some base methods take (mergekit 0.1.5; every other one all of _GTA
# take); tests/merge/test_lines.py checks these names against mergekit's registry
_ONLY = {"gamma": ("breadcrumbs", "breadcrumbs_ties"), "epsilon": ("della", "della_linear")}


def _own(name: str, params: tuple[Param, ...], base_methods: tuple[str, ...] = ()) -> Spec:
    """A method of surgery's own (surgery/merge/<module>.py); a wrapper (``base_methods``) also takes its base
    methods' parameters, unset (None) meaning that method's default (``task_vectors.base_node``)."""
    own = tuple(p.name for p in params)
    if base_methods:
        optional = float | None
        passed = (Param("weight", float, "non_base"), Param("density", optional, "non_base", None),
                  Param("gamma", optional, "non_base", None), Param("epsilon", optional, "non_base", None),
                  Param("normalize", bool | None, "shared", None), Param("int8_mask", bool | None, "shared", None),
                  Param("rescale", bool | None, "shared", None), Param("lambda", optional, "shared", None))
        params += (Param("base_method", str, "shared", base_methods[0]),) + tuple(
            p for p in passed if p.name not in _ONLY or set(_ONLY[p.name]) & set(base_methods))
        own += ("base_method",)
    return Spec(name, params, "required", _contract("required"), mergekit=False, base_methods=base_methods, own=own)


LOCAL = {
    "linear": Spec("linear", (Param("weight", float, "input"), Param("normalize", bool, "shared", True)),
                   "ignored", _contract("ignored")),
    "task_arithmetic": Spec("task_arithmetic", _task_arithmetic_params(False), "required", _contract("required")),
    "ties": Spec("ties", _task_arithmetic_params(True), "required", _contract("required")),
    # surgery's own methods (not in mergekit): surgery/merge/tsv_m.py, iso.py, lines.py, consensus.py
    "tsv_m": _own("tsv_m", (Param("alpha", float, "shared", 1.0), Param("rank_fraction", float | None, "shared",
                                                                        None))),
    "iso_c": _own("iso_c", (Param("alpha", float, "shared", 1.0),)),
    "iso_cts": _own("iso_cts", (Param("alpha", float, "shared", 1.0), Param("common_fraction", float, "shared", 0.8))),
    "lines": _own("lines", (Param("alpha", float, "shared", 0.0), Param("beta", float, "shared", 1.0)), _GTA),
    "consensus": _own("consensus", (Param("k", int, "shared", 2), Param("mask_lambda", float, "shared", 0.6)),
                      ("task_arithmetic", "ties")),
}


def all_parameter_names() -> set[str]:
    """Every parameter name some registered merge method takes."""
    from mergekit import merge_methods

    return ({p.name for m in merge_methods.registered_methods() for p in m.spec.parameters}
            | {p.name for s in LOCAL.values() for p in s.parameters})


def method_names() -> list[str]:
    from mergekit import merge_methods

    return [m.spec.name for m in merge_methods.registered_methods()]


def get_method(name: str):
    """The registered mergekit method, or a SurgeryError with a did-you-mean."""
    from mergekit import merge_methods

    from surgery.errors import SurgeryError

    names = method_names() + [m for m, s in LOCAL.items() if not s.mergekit]
    if name not in names:
        raise SurgeryError(f"unknown merge method {name!r}" + did_you_mean(name, names)
                           + f" (methods: {', '.join(sorted(names))})")
    return merge_methods.get(name)


def from_mergekit(method) -> Spec:
    """A registered mergekit method's spec, in this module's terms."""
    params = tuple(Param(p.name, p.value_type, p.scope.value, REQUIRED if p.required else p.default,
                         p._adapter) for p in method.spec.parameters)
    return Spec(method.spec.name, params, method.spec.contract.base.value,
                lambda ids, base: method.validate_inputs(ids, base))


def spec_of(name: str) -> Spec:
    """The spec of merge method ``name`` (written out here, or mergekit's); SurgeryError if unknown."""
    if name in LOCAL:
        return LOCAL[name]
    return from_mergekit(get_method(name))
