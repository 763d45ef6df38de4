"""Every merge method mergekit registers, as a recipe operation on any selection of tensors.

    operations:
      - merge:
          method: ties                    # any name in mergekit.merge_methods.registered_methods()
          base: base
          models:
            math: {weight: 0.5, density: 0.5}
            swahili: {weight: [0.2, 0.8], density: 0.7}   # a gradient over the selected layers
          parameters: {normalize: true}
          select: {layers: "8-23"}

The math is mergekit's own (``mergekit.merge_methods.api.merge_tensors``); this module only
resolves parameters per tensor the way mergekit-yaml does (per-model before shared, filters,
gradients) and checks them strictly: an unknown method or parameter is an error with a
"did you mean", where mergekit would silently ignore a misspelt parameter.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from surgery.core.devices import current_device
from surgery.core.graph import Node, Op, same_shapes, register
from surgery.operations import merge_numpy, ties_stream  # no heavy imports: numpy and the kernels load when a merge computes
from surgery.operations.merge_checks import all_parameter_names, check_architectures
from surgery.operations.merge_specs import spec_of
from surgery.operations.vocab import vocab_params
from surgery.errors import did_you_mean
from surgery.recipe.schema import Operation, Select

# Methods that draw random numbers (arcee_fusion samples quantiles of tensors over 1M elements).
# With a seed, every merged tensor gets its own seed derived from the recipe seed and its name.
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear", "arcee_fusion")


class Merge(Operation):
    """A mergekit merge method applied to the selected tensors."""

    op_name: ClassVar[str] = "merge"

    method: str = Field(description="mergekit merge method: linear, slerp, ties, dare_ties, ... "
                                    "(`python -c 'import mergekit.merge_methods as m; print([x.spec.name for x in m.registered_methods()])'`).")
    models: Union[list[str], dict[str, Union[dict[str, Any], None]]] = Field(
        description="Inputs to merge, in order: a list of names, or name -> per-model parameters "
                    "({weight: 0.5, density: [0.3, 0.7]}).")
    base: str | None = Field(None, description="Base input (task arithmetic, TIES, DARE, SLERP, ...). "
                                               "Added after the models when not among them, as mergekit does.")
    parameters: dict[str, Any] | None = Field(None, description="Shared parameters, and defaults for per-model ones. "
                                                               "Values may be gradients (lists) or filter lists.")
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = Field(
        None, description="dtype the inputs are converted to before merging (mergekit's `dtype`). "
                          "Default: the inputs' own dtype.")
    kernel: Literal["exact", "fast"] = Field("exact", description="'fast': TIES keeps its top-density entries by "
                                            "selection instead of a full sort (several times faster); entries whose "
                                            "magnitude equals the threshold may be picked differently from mergekit.")
    select: Select | None = None

    def model_names(self) -> list[str]:
        return list(self.models)

    def inputs_in_order(self) -> list[str]:
        names = self.model_names()
        return names + [self.base] if self.base and self.base not in names else names

    def model_parameters(self, name: str) -> dict[str, Any]:
        if isinstance(self.models, dict):
            return self.models.get(name) or {}
        return {}

    def input_refs(self):
        return {"models": self.model_names(), **({"base": [self.base]} if self.base else {})}

    def plan(self, ctx) -> None:
        _plan_merge(ctx, self)

# ---------------------------------------------------------------------------- parameter settings

# mergekit's parameter settings (mergekit/config.py), mirrored here because importing
# mergekit.config pulls in peft and transformers (~4 s). Same types and the same resolution;
# the only difference is that a misspelt key in a {value, filter} condition is an error.
Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)
    value: ScalarOrGradient
    filter: str | None = None


Setting = Union[Condition, list[Condition], ScalarOrGradient]


def parse_setting(value):
    """A YAML parameter value -> a setting: scalar, gradient (list), or list of {value, filter}."""
    from pydantic import TypeAdapter

    return TypeAdapter(Setting).validate_python(value)


def evaluate_setting(tensor_name: str, setting, t: float, *, validate):
    """mergekit.config.evaluate_setting: filters match by substring; gradients interpolate at t."""
    if isinstance(setting, Condition):
        setting = [setting]
    if isinstance(setting, (float, int, bool, str)):
        return validate(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (float, int, bool, str)) for e in setting):
            values = [validate(e) for e in setting]
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return validate((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(tensor_name, cond.value, t, validate=validate)
        return None
    raise ValueError(f"unexpected setting value: {setting!r}")


def resolve(parameter, settings: list, tensor_name: str, t: float):
    """mergekit's precedence: the first scope holding the parameter whose filters match wins."""
    for setting in settings:
        if setting is not None:
            value = evaluate_setting(tensor_name, setting, t, validate=parameter.validate)
            if value is not None:
                return value
    if parameter.required:
        raise KeyError(parameter.name)
    return parameter.validate(parameter.default)


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: the same tensor gets the same random draws whatever the order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------------------- the tensor op

def _compute(tensors, p):
    import torch
    from mergekit.merge_methods.api import merge_tensors
    from mergekit.merge_methods.buffers import copy_non_floating_buffer

    buffer = copy_non_floating_buffer(tensors, p["name"])
    if buffer is not None:
        return buffer
    device = current_device()  # --device cuda: the inputs stream to the GPU, the writer brings the result back
    if device != "cpu":
        tensors = [t.to(device) for t in tensors]
    if p.get("dtype"):
        dtype = getattr(torch, p["dtype"])
        tensors = [t.to(dtype) for t in tensors]
    if p.get("vocab") is not None:  # rows re-indexed to the output vocabulary first, as mergekit does
        from surgery.operations.vocab import permute

        tensors = permute(tensors, p["ids"], p)
    ids = p["ids"]
    parameters = dict(p["shared"])
    per_input: dict[str, dict] = {}
    for i, values in p["per_input"].items():
        for k, v in values.items():
            per_input.setdefault(k, {})[i] = v
    parameters.update(per_input)
    from surgery.operations.merge_kernels import fast_kernel

    kernel = fast_kernel(p["method"], parameters)
    if kernel is not None:
        return kernel(p["method"], tensors, ids, p["base_index"], parameters, fast=p.get("kernel") == "fast")
    from surgery.core.threads import one_thread

    # mergekit's own kernels on one torch thread: their whole-tensor sums and norms (DARE's and DELLA's
    # rescale, model_stock's cosines) round differently for each thread count, and seeded results must not
    # depend on the machine's cores. surgery's drivers above are elementwise and need no such care.
    call = lambda: merge_tensors(tensors, p["method"], parameters=parameters, ids=ids,  # noqa: E731
                                 base_index=p["base_index"], name=p["name"])
    with one_thread():
        if p.get("seed") is None:
            return call()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p["seed"])
            return call()


def _result_dtype(params: dict, stored: tuple[str, ...]) -> str | None:
    """The safetensors dtype mergekit's method returns for these input dtypes (run on 4x4 tensors).

    mergekit writes a method's result in the dtype it comes out in (arcee_fusion returns float32
    for bfloat16 inputs), so the plan does the same unless an output dtype is set.
    """
    if params["method"] in merge_numpy.METHODS and params.get("vocab") is None:
        known = merge_numpy.merge_dtype(params, list(stored))  # these methods return their merge dtype: no torch needed
        if known is not None:
            return known
    import torch

    from surgery.io.safetensors import st_dtype, torch_dtype

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(4, 4, generator=gen).to(torch_dtype(d)) for d in stored]
    if not all(t.is_floating_point() for t in tensors):
        return None
    try:
        return st_dtype(_compute(tensors, {**params, "name": "probe", "seed": 0, "vocab": None}).dtype)
    except Exception:  # noqa: BLE001 - the real tensors will report the problem with their name
        return None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _describe(args: list[str], p) -> str:
    parts = []
    for arg, i in zip(args, p["ids"]):
        values = p["per_input"].get(i, {})
        defaults = p.get("defaults", {})
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()
                          if v is not None and (k not in defaults or defaults[k] != v))
        tag = " [base]" if p["base_index"] is not None and p["ids"][p["base_index"]] == i else ""
        parts.append(f"{arg}{tag}" + (f"({shown})" if shown else ""))
    shared = ", ".join(f"{k}={_fmt(v)}" for k, v in p["shared"].items() if k not in defaults or defaults[k] != v)
    label = p["method"] + (" [fast kernel]" if p.get("kernel") == "fast" else "")
    vocab = f" [{p['vocab'].describe()}]" if p.get("vocab") is not None else ""
    return f"{label}: " + " + ".join(parts) + (f"; {shared}" if shared else "") + vocab


def _shape(shapes: list[tuple], params: dict) -> tuple:
    if params.get("vocab") is not None:
        from surgery.operations.vocab import shape

        return shape(shapes, params)
    return same_shapes(shapes, params)


register("mergekit", Op(shape=_shape, compute=_compute, describe=_describe, raw=True, numpy=merge_numpy.compute,
                        numpy_when=merge_numpy.supports, numpy_elementwise=merge_numpy.elementwise,
                        numpy_stored=merge_numpy.compute_stored, numpy_prepare=ties_stream.prepare))


# ---------------------------------------------------------------------------- planner

def _parse_settings(ctx, params: dict | None, valid: list[str], path: tuple, method: str,
                    shared_only: set[str] = frozenset()) -> dict:
    """Parse a scope's settings. A name no method takes is an error (a typo); one that other methods take,
    or a shared parameter given per model, is ignored with a warning, as mergekit ignores it."""
    import warnings

    out = {}
    for key, value in (params or {}).items():
        if key not in valid:
            if key in shared_only:
                warnings.warn(f"{ctx.recipe.where(ctx.path + path + (key,))}: {key!r} is a shared parameter of "
                              f"{method}, so a per-model value is ignored (as mergekit ignores it); set it under "
                              "'parameters'", stacklevel=2)
                continue
            if key in all_parameter_names():
                warnings.warn(f"{ctx.recipe.where(ctx.path + path + (key,))}: parameter {key!r} is ignored: "
                              f"merge method {method!r} does not use it (mergekit ignores it too; "
                              f"{method} takes: {', '.join(valid) or 'no parameters'})", stacklevel=2)
                continue
            raise ctx.error(path + (key,), f"unknown parameter {key!r} for merge method {method!r}"
                            + did_you_mean(str(key), valid)
                            + f" ({method} takes: {', '.join(valid) or 'no parameters'})")
        try:
            out[key] = parse_setting(value)
        except Exception:  # noqa: BLE001 - pydantic's message is long; ours says what is expected
            raise ctx.error(path + (key,), f"bad value for {key!r}: expected a number, bool or string, a list "
                                           "of them (a gradient over layers), or a list of {value, filter} "
                                           f"(got {value!r})") from None
    return out


def layer_positions(entries) -> dict:
    """Layer -> t in [0, 1] for gradients: spread over the selected layers, as mergekit spreads a slice."""
    layers = sorted({e.info.layer for e in entries if e.info.layer is not None})
    if len(layers) == 1:
        return {layers[0]: 1.0}  # mergekit: a one-layer slice has t = 1
    return {layer: i / (len(layers) - 1) for i, layer in enumerate(layers)}


def _plan_merge(ctx, op: Merge) -> None:
    from surgery.errors import SurgeryError

    try:
        spec = spec_of(op.method)
    except SurgeryError as e:
        raise ctx.error(("method",), str(e)) from None
    names = op.inputs_in_order()
    try:
        spec.validate_inputs(names, op.base)
    except ValueError as e:
        msg = str(e).replace("Merge method", f"merge method {op.method!r}")
        raise ctx.error(("base",) if "base" in msg.lower() else ("models",), msg) from None
    if len(set(names)) != len(names):
        raise ctx.error(("models",), "an input is listed twice")

    shared_specs, input_specs = spec.shared, spec.per_input
    all_names = [p.name for p in spec.parameters]
    shared = _parse_settings(ctx, op.parameters, all_names, ("parameters",), op.method)
    per_model = {m: _parse_settings(ctx, op.model_parameters(m), [p.name for p in input_specs],
                                    ("models", m), op.method, {p.name for p in shared_specs})
                 for m in op.model_names()}
    base_index = names.index(op.base) if op.base and spec.base != "ignored" else None
    defaults = {p.name: p.default for p in spec.parameters if not p.required}
    seed = ctx.recipe.seed
    random = op.method in RANDOM_METHODS
    if random and seed is None:
        ctx.annotations.append(f"{ctx.path[2]} #{ctx.path[1] + 1} ({op.method}) is random and no seed is set: "
                               "results differ between runs (set 'seed:' or --random-seed)")

    check_architectures(ctx, names)

    entries = ctx.select(op.select)
    positions = layer_positions(entries)
    result_dtypes: dict = {}
    for e in entries:
        t = positions.get(e.info.layer, 0.0) if e.info.layer is not None else 0.0
        refs = [ctx.ref(m, e) for m in names]
        try:
            values = {p.name: resolve(p, [shared.get(p.name)], e.name, t) for p in shared_specs}
            per_input = {}
            for m, r in zip(names, refs):
                is_base = base_index is not None and m == op.base
                per_input[m] = {p.name: resolve(p, [per_model.get(m, {}).get(p.name), shared.get(p.name)], r.name, t)
                                for p in input_specs if not (is_base and p.scope == "non_base")}
        except KeyError as ex:
            raise ctx.error(("models",), f"merge method {op.method!r} needs parameter {ex.args[0]!r} for every "
                                         f"model (tensor {e.name!r}); set it per model or under 'parameters'") from None
        except (ValueError, TypeError) as ex:
            first = str(ex).strip().splitlines()
            raise ctx.error(("parameters",), f"bad parameter value for tensor {e.name!r}: "
                                             f"{first[-1] if first else ex}") from None
        vocab = vocab_params(ctx, e, op.base)
        if op.method == "passthrough" and op.dtype is None and per_input[names[0]].get("scale") is None \
                and not vocab:
            ctx.assign(e, refs[0])
            continue
        params = {**vocab, "method": op.method, "ids": names, "base_index": base_index, "shared": values,
                  "per_input": per_input, "dtype": op.dtype, "name": e.name, "defaults": defaults,
                  "seed": tensor_seed(seed, e.name) if seed is not None else None, "kernel": op.kernel}
        stored = tuple(ctx.inputs[r.input].meta[r.name].dtype if r.name in ctx.inputs[r.input] else None
                       for r in refs)
        if None not in stored:
            key = (stored, op.dtype, bool(vocab))
            if key not in result_dtypes:
                result_dtypes[key] = _result_dtype(params, stored)
            params["out_dtype"] = result_dtypes[key]
        ctx.assign(e, Node("mergekit", refs, params))


def use_fast_kernels(recipe):
    """Set ``kernel: fast`` on every merge operation of a recipe (what --fast-kernels does)."""
    for op in recipe.operations:
        if isinstance(op, Merge):
            op.kernel = "fast"
    return recipe
