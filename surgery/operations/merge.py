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

from typing import Any, ClassVar, Literal, Union

from pydantic import Field

from surgery import merge  # no heavy imports: numpy, torch and the kernels load when a merge computes
from surgery.core.graph import Node, Op, same_shapes, register
from surgery.errors import did_you_mean
from surgery.merge.settings import parse_setting, resolve, tensor_seed
from surgery.merge.specs import all_parameter_names, spec_of
from surgery.operations.vocab import vocab_params
from surgery.recipe.schema import Operation, Select

# Methods that draw random numbers (arcee_fusion samples quantiles of tensors over 1M elements).
# With a seed, every merged tensor gets its own seed derived from the recipe seed and its name.
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear", "arcee_fusion")


class Merge(Operation):
    """A mergekit merge method applied to the selected tensors."""

    op_name: ClassVar[str] = "merge"

    method: str = Field(description="mergekit merge method: linear, slerp, ties, dare_ties, ... "
                                    "(`python -c 'import mergekit.merge_methods as m; print([x.spec.name for x in "
                                    "m.registered_methods()])'`).")
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

# ---------------------------------------------------------------------------- the tensor op

def _compute(tensors, p):
    """The node's merged tensor (``surgery.merge``); union vocabularies re-index rows first, as mergekit does."""
    permute = None
    if p.get("vocab") is not None:
        from surgery.operations.vocab import permute as vocab_permute

        def permute(ts):
            return vocab_permute(ts, p["ids"], p)
    return merge.compute(tensors, p, permute)


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


# host_kernel is None for union-vocabulary nodes too: table.choose keeps their row permutation on torch
register("mergekit", Op(shape=_shape, compute=_compute, describe=_describe, raw=True, host=merge.host_kernel))


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


def check_architectures(ctx, names: list[str]) -> None:
    """Merged inputs (and the recipient, and the models a stack takes layers from) share one architecture
    (mergekit refuses others without --allow-crimes)."""
    stacked = [seg.from_ for seg in ctx.recipe.stack or [] if seg.from_]  # a frankenmerge's other models
    archs = {}
    for m in dict.fromkeys([ctx.recipient, *names, *stacked]):
        cfg = getattr(ctx.inputs[m], "config", None) or {}  # a plan's result (PlanReader) has no config
        arch = (cfg.get("architectures") or [cfg.get("model_type")])[0]
        if arch:
            archs[m] = arch
    if len(set(archs.values())) > 1:
        shown = ", ".join(f"{m} is {a}" for m, a in archs.items())
        raise ctx.error(("models",), f"the merged models have different architectures ({shown}); a merge "
                                     "combines tensors of one architecture (mergekit refuses this too, "
                                     "unless --allow-crimes)")


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
    if spec.base_methods:
        _check_base_method(ctx, op, spec, shared, per_model)
    base_index = names.index(op.base) if op.base and spec.base != "ignored" else None
    defaults = {p.name: p.default for p in spec.parameters if not p.required}
    seed = ctx.recipe.seed
    random = op.method in RANDOM_METHODS or shared.get("base_method") in RANDOM_METHODS
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
                result_dtypes[key] = merge.result_dtype(params, stored)
            params["out_dtype"] = result_dtypes[key]
        if not spec.mergekit:  # surgery's own methods: the SVD ones merge block matrices, LiNeS scales by depth
            params.update(layer=e.info.layer, layers=ctx.n_layers)
        ctx.assign(e, Node("mergekit", refs, params))


def _check_base_method(ctx, op: Merge, spec, shared: dict, per_model: dict) -> None:
    """A wrapper method (lines, consensus): ``base_method`` is one it can run, and every parameter given that is
    not the wrapper's own is one the base method takes."""
    base = shared.get("base_method", spec.base_methods[0])
    if not isinstance(base, str) or base not in spec.base_methods:
        raise ctx.error(("parameters", "base_method"), f"base_method of {op.method} must be one of "
                        f"{', '.join(spec.base_methods)} (got {base!r})" + did_you_mean(str(base), spec.base_methods))
    takes = [p.name for p in spec_of(base).parameters]
    given = [(("parameters", k), k) for k in shared] + [(("models", m, k), k) for m, v in per_model.items() for k in v]
    for path, key in given:
        if key not in spec.own and key not in takes:
            raise ctx.error(path, f"parameter {key!r} is not one of base_method {base}'s ({base} takes: "
                                  f"{', '.join(takes)}; {op.method} itself takes: {', '.join(spec.own)})")


def use_fast_kernels(recipe):
    """Set ``kernel: fast`` on every merge operation of a recipe (what --fast-kernels does)."""
    for op in recipe.operations:
        if isinstance(op, Merge):
            op.kernel = "fast"
    return recipe
