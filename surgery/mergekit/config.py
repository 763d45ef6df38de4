"""mergekit configs as surgery recipes: `surgery run mergekit.yml -o out/` runs them unchanged.

    recipe = load_recipe("mergekit.yml")    # detected by its keys (merge_method, models/slices/modules)
    data = translate(config_dict)           # the equivalent recipe, as a dict

The translation is one recipe with the same meaning as mergekit-yaml's plan:
- ``models:``  -> one ``merge`` operation over every tensor (the base model is appended to
  the inputs when not listed, as mergekit does);
- ``slices:``  -> a ``stack`` (one segment per slice: the first source's layers, the other
  sources' layers beside them), one ``merge`` per slice on its output layers, plus merges of
  the embeddings (sources and parameters of the first slice) and of the final norm and
  lm_head (of the last slice), as mergekit plans them;
- ``modules: {default: ...}`` (the one module of a text model) -> the same, with the module's
  parameters between the slice's and the global ones;
- ``parameters`` at slice level come before the global ones (mergekit's precedence);
- ``dtype`` is the dtype inputs are merged in, ``out_dtype`` the output dtype (without it a
  tensor keeps the dtype its method returns); config.json gets ``out_dtype`` else ``dtype``;
- mixture-of-experts checkpoints are read with their experts fused (``experts: fused``), as mergekit reads
  them: one tensor per layer and projection, merged at once and written under mergekit's names;
- ``model+lora`` references become adapter inputs (the LoRA applied to its base);
- ``tokenizer``/``tokenizer_source``/``chat_template`` become the recipe's ``tokenizer`` and
  ``chat_template`` (surgery.operations.vocab builds the tokenizer and re-indexes rows).
Unknown keys and parameters are errors with a "did you mean", or the place the key belongs
(mergekit ignores them silently, so a typo changes the merge unnoticed); keys mergekit ignores that
published configs carry (a top-level ``int8_mask``) are warnings. ``lenient=True`` (``surgery run
--mergekit-lenient``) runs a config as mergekit does: every unknown key is ignored with a warning.
A tied lm_head is skipped, as mergekit skips an optional tensor (the last slice's merge selects
with ``missing: skip``).
"""

from __future__ import annotations

import re
import warnings
from pathlib import PurePosixPath
from typing import Any

from surgery.errors import RecipeError, did_you_mean
from surgery.mergekit.params import chain, parse_parameters
from surgery.mergekit.refs import DTYPES, IGNORED_TOP, MOE_MESSAGE, TOKEN_KEYS, TOKENIZER_KEYS, \
    is_moe_config, model_ref, translate_tokenizer

TOP_KEYS = ("merge_method", "models", "slices", "base_model", "dtype", "out_dtype", "parameters",
            "tokenizer_source", "tokenizer", "chat_template", "modules")
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
MODULE_KEYS = ("models", "slices", "parameters")
# where each key is valid, to say where a misplaced one belongs (as a person writes the YAML path)
SCOPES = {"": TOP_KEYS, "models[]": MODEL_KEYS, "slices[]": SLICE_KEYS, "slices[].sources[]": SOURCE_KEYS,
          "modules.default": MODULE_KEYS, "tokenizer": TOKENIZER_KEYS, "tokenizer.tokens.<token>": TOKEN_KEYS}
LENIENT = "--mergekit-lenient ignores it too, with a warning"


def is_mergekit_config(data) -> bool:
    return isinstance(data, dict) and "inputs" not in data and (
        "merge_method" in data or "slices" in data or "modules" in data or is_moe_config(data)
        or ("models" in data and "operations" not in data))


class _Translator:
    def __init__(self, data: dict, source: str | None, lines: dict, lenient: bool = False):
        self.data, self.source, self.lines, self.lenient = data, source, lines, lenient
        self.spec = None  # the merge method's (surgery.merge.specs.Spec), once known
        self.inputs: dict[str, str] = {}   # recipe name -> model reference
        self.names: dict[str, str] = {}    # model reference -> recipe name
        self.path_map: dict[tuple, tuple] = {}

    # ---- errors ------------------------------------------------------------
    def error(self, path: tuple, message: str) -> RecipeError:
        from surgery.recipe.locations import where as _where

        return RecipeError(message, _where(self.source, self.lines, path))

    def check_keys(self, d, valid, path: tuple, what: str) -> dict:
        """``d`` without unknown keys; each is an error, or (lenient) a warning, saying where it belongs."""
        if not isinstance(d, dict):
            raise self.error(path, f"{what} must be a mapping (got {d!r})")
        for key in d:
            if key not in valid:
                homes = [f"{scope}.{key}" if scope else str(key) for scope, keys in SCOPES.items()
                         if key in keys and keys is not valid]
                hint = (f": it belongs in {' or '.join(homes)}" if homes else did_you_mean(key, valid)
                        + f" (valid keys: {', '.join(valid)})")
                self.unknown(path + (key,), f"unknown key {key!r} in {what}{hint}")
        return {k: v for k, v in d.items() if k in valid}

    def unknown(self, path: tuple, message: str) -> None:
        """Something mergekit silently ignores where it stands: an error, or (lenient) a warning."""
        if not self.lenient:
            raise self.error(path, f"{message}; mergekit ignores it where it stands ({LENIENT})")
        self.warn(path, f"{message}; ignored, as mergekit ignores it where it stands")

    def warn(self, path: tuple, message: str) -> None:
        from surgery.recipe.locations import where as _where

        warnings.warn(f"{_where(self.source, self.lines, path)}: {message}", stacklevel=2)

    # ---- pieces ------------------------------------------------------------
    def model(self, ref, path: tuple) -> str:
        """Register a model reference as a recipe input; return its input name."""
        try:
            model, lora = model_ref(ref)
        except ValueError as e:
            raise self.error(path, str(e)) from None
        key = model + (f"+{lora}" if lora else "")
        if key in self.names:
            return self.names[key]
        if lora:  # mergekit's 'base+lora': the adapter applied to its base, read as one model
            base = self.model(model, path)
            name = self.new_name(f"{base}+{self.stem(lora)}")
            self.inputs[name] = {"adapter": lora, "base": base}
        else:
            name = self.new_name(self.stem(model))
            self.inputs[name] = model
        self.names[key] = name
        self.path_map[("inputs", name)] = path
        return name

    @staticmethod
    def stem(ref: str) -> str:
        return re.sub(r"[^\w.+-]", "_", PurePosixPath(ref.rstrip("/").split("@")[0]).name) or "model"

    def new_name(self, stem: str) -> str:
        name, i = stem, 2
        while name in self.inputs:
            name, i = f"{stem}_{i}", i + 1
        return name

    def dtype(self, key: str):
        value = self.data.get(key)
        if value is None:
            return None
        if value not in DTYPES:
            raise self.error((key,), f"unknown dtype {value!r}" + did_you_mean(value, DTYPES)
                             + " (float32, float16, bfloat16)")
        return DTYPES[value]

    def parameters(self, params, path: tuple) -> dict:
        return parse_parameters(self, params, path)

    def require(self, d: dict, key: str, path: tuple) -> None:
        if key not in d:
            raise self.error(path + (key,), f"missing required key {key!r}")

    # ---- the whole config ----------------------------------------------------
    def translate(self) -> dict:
        d = self.data
        if is_moe_config(d):
            raise self.error(("experts",), MOE_MESSAGE)
        for key in [k for k in d if k in IGNORED_TOP]:
            self.warn((key,), f"top-level {key!r} is ignored, as mergekit ignores it ({IGNORED_TOP[key]})")
            d = {k: v for k, v in d.items() if k != key}
        d = self.data = self.check_keys(d, TOP_KEYS, (), "a mergekit config")
        if "merge_method" not in d:
            raise self.error((), "missing required key 'merge_method'")
        method = d["merge_method"]
        from surgery.errors import SurgeryError
        from surgery.merge.specs import spec_of

        try:
            spec = self.spec = spec_of(str(method))
        except SurgeryError as e:
            raise self.error(("merge_method",), str(e)) from None
        body, body_path, module_params = d, (), {}
        if d.get("modules") is not None:
            body, body_path, module_params = self.module(d)
        if sum(bool(d.get(k)) for k in ("models", "slices", "modules")) != 1:
            raise self.error((), "exactly one of 'models', 'slices' or 'modules' must be present")
        base = self.model(d["base_model"], ("base_model",)) if d.get("base_model") is not None else None
        global_params = chain(module_params, self.parameters(d.get("parameters"), ("parameters",)))
        compute_dtype, out_dtype = self.dtype("dtype"), self.dtype("out_dtype")
        common = {"method": method, **({"dtype": compute_dtype} if compute_dtype else {})}

        # experts fused as mergekit reads them: a merge sees every expert of a layer at once (core.experts)
        recipe: dict[str, Any] = {"description": f"mergekit config ({method})", "inputs": self.inputs,
                                  "experts": "fused"}
        if body.get("models"):
            operations, recipient = self.models(body["models"], body_path, base, global_params, common)
        else:
            operations, recipe["stack"], recipient = self.slices(body["slices"], body_path, base, global_params,
                                                                 common, spec)
        recipe["recipient"] = recipient
        recipe["operations"] = operations
        if (out_dtype or compute_dtype) == "float64":  # the output would be float64
            raise self.error(("out_dtype" if out_dtype else "dtype",), "float64 output is not supported; "
                             "set out_dtype to float32, float16 or bfloat16")
        if out_dtype:  # without out_dtype mergekit writes each tensor as its method returns it
            recipe["output"] = {"dtype": out_dtype}
        if out_dtype or compute_dtype:
            recipe.setdefault("output", {})["config_dtype"] = out_dtype or compute_dtype
        translate_tokenizer(self, recipe, base)
        return recipe

    def module(self, d: dict):
        """``modules:``: mergekit's per-module configs. A text model has one module, 'default'."""
        modules = d["modules"]
        if not isinstance(modules, dict) or not modules:
            raise self.error(("modules",), "modules must be a mapping of module name -> {models|slices, parameters}")
        names = list(modules)
        if names != ["default"]:
            other = [n for n in names if n != "default"]
            raise self.error(("modules", other[0]), f"per-module configs for multimodal models (module {other[0]!r})"
                             " are not supported: surgery lays out one stack of layers per model, and a vision "
                             "tower beside a text decoder needs a layout per module; merge the text model with "
                             "'models' or 'modules: {default: ...}'")
        body = self.check_keys(modules["default"], MODULE_KEYS, ("modules", "default"), "a module")
        if bool(body.get("models")) == bool(body.get("slices")):
            raise self.error(("modules", "default"), "a module needs exactly one of 'models' or 'slices'")
        params = self.parameters(body.get("parameters"), ("modules", "default", "parameters"))
        return body, ("modules", "default"), params

    def models(self, models, prefix: tuple, base, global_params: dict, common: dict):
        if not isinstance(models, list):
            raise self.error(prefix + ("models",), "models must be a list of {model: ..., parameters: ...}")
        entries = {}
        for i, m in enumerate(models):
            path = prefix + ("models", i)
            m = {"model": m} if isinstance(m, str) else m
            self.check_keys(m, MODEL_KEYS, path, "a model entry")
            self.require(m, "model", path)
            name = self.model(m["model"], path + ("model",))
            if name in entries:
                raise self.error(path + ("model",), f"model {m['model']!r} is listed twice")
            entries[name] = self.parameters(m.get("parameters"), path + ("parameters",))
            self.path_map[("operations", 0, "merge", "models", name)] = path + ("parameters",)
        op = {**common, "models": entries, "parameters": global_params}
        if base:
            op["base"] = base
        self.path_map[("operations", 0, "merge", "parameters")] = ("parameters",)
        self.path_map[("operations", 0, "merge")] = ("merge_method",)
        return [{"merge": op}], base or next(iter(entries))

    def slices(self, slices, prefix: tuple, base, global_params, common, spec):
        if not isinstance(slices, list):
            raise self.error(prefix + ("slices",), "slices must be a list of {sources: [...]}")
        stack, per_slice = [], []
        out_start = 0
        base_policy = spec.base
        for i, sl in enumerate(slices):
            path = prefix + ("slices", i)
            self.check_keys(sl, SLICE_KEYS, path, "a slice")
            if sl.get("residual_weight") is not None:
                self.warn(path + ("residual_weight",), "residual_weight is ignored, as mergekit 0.1.5 ignores it "
                          "(no merge method reads it)")
            sources = sl.get("sources")
            if not isinstance(sources, list) or not sources:
                raise self.error(path + ("sources",), "a slice needs a non-empty list of sources")
            names, ranges, params = [], [], {}
            for j, src in enumerate(sources):
                spath = path + ("sources", j)
                self.check_keys(src, SOURCE_KEYS, spath, "a slice source")
                for key in ("model", "layer_range"):
                    self.require(src, key, spath)
                name = self.model(src["model"], spath + ("model",))
                if name in names:
                    raise self.error(spath + ("model",), f"model {src['model']!r} appears twice in one slice")
                lr = src["layer_range"]
                if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr)
                        and 0 <= lr[0] < lr[1]):
                    raise self.error(spath + ("layer_range",), f"layer_range is [start, end) with "
                                     f"0 <= start < end (got {lr!r})")
                names.append(name)
                ranges.append(lr)
                params[name] = self.parameters(src.get("parameters"), spath + ("parameters",))
            n = ranges[0][1] - ranges[0][0]
            for j, lr in enumerate(ranges):
                if lr[1] - lr[0] != n:
                    raise self.error(path + ("sources", j, "layer_range"), "all sources of a slice must "
                                     f"have the same number of layers ({n} and {lr[1] - lr[0]})")
            seg = {"layers": f"{ranges[0][0]}-{ranges[0][1] - 1}", "from": names[0]}
            if len(names) > 1:
                seg["sources"] = {nm: f"{lr[0]}-{lr[1] - 1}" for nm, lr in zip(names[1:], ranges[1:])}
            stack.append(seg)
            self.path_map[("stack", i, "layers")] = path + ("sources", 0, "layer_range")
            for j, nm in enumerate(names[1:], 1):
                self.path_map[("stack", i, "sources", nm)] = path + ("sources", j, "layer_range")
            slice_base = self.model(sl["base_model"], path + ("base_model",)) if sl.get("base_model") else base
            if slice_base and slice_base not in names:
                if base_policy in ("required", "optional", "forbidden"):
                    raise self.error(path + ("sources",), f"the base model {self.inputs[slice_base]!r} is not "
                                     f"among this slice's sources (merge method {common['method']!r} uses a base)")
                slice_base = None
            shared = chain(self.parameters(sl.get("parameters"), path + ("parameters",)), global_params)
            per_slice.append((names, params, slice_base if base_policy != "ignored" or slice_base else None,
                              shared, out_start, n, i))
            out_start += n

        operations = []

        def merge(names, params, slice_base, shared, select, slice_index):
            k = len(operations)
            op = {**common, "models": {nm: params[nm] for nm in names}, "parameters": shared, "select": select}
            if slice_base:
                op["base"] = slice_base
            for j, nm in enumerate(names):
                self.path_map[("operations", k, "merge", "models", nm)] = prefix + (
                    "slices", slice_index, "sources", j, "parameters")
            self.path_map[("operations", k, "merge", "parameters")] = prefix + ("slices", slice_index, "parameters")
            self.path_map[("operations", k, "merge")] = prefix + ("slices", slice_index)
            operations.append({"merge": op})

        first, last = per_slice[0], per_slice[-1]
        merge(first[0], first[1], first[2], first[3], {"modules": ["embed"]}, first[6])
        merge(last[0], last[1], last[2], last[3], {"modules": ["final_norm", "lm_head"], "missing": "skip"},
              last[6])  # a tied lm_head is no tensor: mergekit skips it (an optional weight)
        for names, params, slice_base, shared, start, n, i in per_slice:
            merge(names, params, slice_base, shared, {"layers": f"{start}-{start + n - 1}"}, i)
        return operations, stack, base or per_slice[0][0][0]


def translate(data: dict, source: str | None = None, lines: dict | None = None, *,
              lenient: bool = False) -> tuple[dict, dict]:
    """A mergekit config dict -> (recipe dict, recipe path prefix -> config path) for error messages.
    ``lenient``: unknown keys and parameters are ignored with a warning, as mergekit ignores them."""
    t = _Translator(data, source, lines or {}, lenient)
    return t.translate(), t.path_map
