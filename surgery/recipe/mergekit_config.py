"""mergekit configs as surgery recipes: `surgery run mergekit.yml -o out/` runs them unchanged.

    recipe = load_recipe("mergekit.yml")    # detected by its keys (merge_method, models/slices)
    data = translate(config_dict)           # the equivalent recipe, as a dict

The translation is one recipe with the same meaning as mergekit-yaml's plan:
- ``models:``  -> one ``merge`` operation over every tensor (the base model is appended to
  the inputs when not listed, as mergekit does);
- ``slices:``  -> a ``stack`` (one segment per slice: the first source's layers, the other
  sources' layers beside them), one ``merge`` per slice on its output layers, plus merges of
  the embeddings (sources and parameters of the first slice) and of the final norm and
  lm_head (of the last slice), as mergekit plans them;
- ``parameters`` at slice level come before the global ones (mergekit's precedence);
- ``dtype`` is the dtype inputs are merged in, ``out_dtype`` (else ``dtype``) the output dtype;
- ``tokenizer_source: base`` or a model copies that model's tokenizer files.
Unknown keys are errors with a "did you mean" (mergekit ignores them silently).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from surgery.errors import RecipeError, did_you_mean

TOP_KEYS = ("merge_method", "models", "slices", "base_model", "dtype", "out_dtype", "parameters",
            "tokenizer_source", "tokenizer", "chat_template", "modules")
UNSUPPORTED = {
    "modules": "per-module configs (multimodal models) are not supported; use 'models' or 'slices'",
    "tokenizer": "the 'tokenizer' section (vocabulary surgery) is not supported; use "
                 "tokenizer_source: base or a model name",
    "chat_template": "'chat_template' is not supported; edit tokenizer_config.json after the merge",
}
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64",
          "torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}


def is_mergekit_config(data) -> bool:
    return isinstance(data, dict) and "inputs" not in data and (
        "merge_method" in data or "slices" in data or ("models" in data and "operations" not in data))


class _Translator:
    def __init__(self, data: dict, source: str | None, lines: dict):
        self.data, self.source, self.lines = data, source, lines
        self.inputs: dict[str, str] = {}   # recipe name -> model reference
        self.names: dict[str, str] = {}    # model reference -> recipe name
        self.path_map: dict[tuple, tuple] = {}

    # ---- errors ------------------------------------------------------------
    def error(self, path: tuple, message: str) -> RecipeError:
        from surgery.recipe.locations import where as _where

        return RecipeError(message, _where(self.source, self.lines, path))

    def check_keys(self, d, valid, path: tuple, what: str) -> dict:
        if not isinstance(d, dict):
            raise self.error(path, f"{what} must be a mapping (got {d!r})")
        for key in d:
            if key not in valid:
                raise self.error(path + (key,), f"unknown key {key!r} in {what}" + did_you_mean(key, valid)
                                 + f" (valid keys: {', '.join(valid)}); mergekit would silently ignore it")
        return d

    # ---- pieces ------------------------------------------------------------
    def model(self, ref, path: tuple) -> str:
        """Register a model reference as a recipe input; return its input name."""
        if isinstance(ref, dict):
            raise self.error(path, "model references are strings: a local path or a Hub id 'org/name'")
        if not isinstance(ref, str) or not ref:
            raise self.error(path, f"expected a model path or Hub id (got {ref!r})")
        if "+" in ref:
            raise self.error(path, f"LoRA model references ({ref!r}) are not supported; merge the adapter first")
        if ref in self.names:
            return self.names[ref]
        stem = re.sub(r"[^\w.-]", "_", PurePosixPath(ref.rstrip("/").split("@")[0]).name) or "model"
        name, i = stem, 2
        while name in self.inputs:
            name, i = f"{stem}_{i}", i + 1
        self.inputs[name], self.names[ref] = ref, name
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
        if params is None:
            return {}
        if not isinstance(params, dict):
            raise self.error(path, f"parameters must be a mapping of name -> value (got {params!r})")
        return dict(params)

    # ---- the whole config ----------------------------------------------------
    def translate(self) -> dict:
        d = self.data
        self.check_keys(d, TOP_KEYS, (), "a mergekit config")
        for key, why in UNSUPPORTED.items():
            if d.get(key) is not None:
                raise self.error((key,), why)
        if "merge_method" not in d:
            raise self.error((), "missing required key 'merge_method'")
        method = d["merge_method"]
        if bool(d.get("models")) == bool(d.get("slices")):
            raise self.error((), "exactly one of 'models' or 'slices' must be present")

        from surgery.operations.merge import get_method
        from surgery.errors import SurgeryError

        try:
            spec = get_method(str(method)).spec
        except SurgeryError as e:
            raise self.error(("merge_method",), str(e)) from None
        base = self.model(d["base_model"], ("base_model",)) if d.get("base_model") is not None else None
        global_params = self.parameters(d.get("parameters"), ("parameters",))
        compute_dtype, out_dtype = self.dtype("dtype"), self.dtype("out_dtype")
        common = {"method": method, **({"dtype": compute_dtype} if compute_dtype else {})}

        recipe: dict[str, Any] = {"description": f"mergekit config ({method})", "inputs": self.inputs}
        operations: list[dict] = []
        if d.get("models"):
            models = d["models"]
            if not isinstance(models, list):
                raise self.error(("models",), "models must be a list of {model: ..., parameters: ...}")
            entries = {}
            for i, m in enumerate(models):
                m = {"model": m} if isinstance(m, str) else m
                self.check_keys(m, MODEL_KEYS, ("models", i), "a model entry")
                if "model" not in m:
                    raise self.error(("models", i), "missing required key 'model'")
                name = self.model(m["model"], ("models", i, "model"))
                if name in entries:
                    raise self.error(("models", i, "model"), f"model {m['model']!r} is listed twice")
                entries[name] = self.parameters(m.get("parameters"), ("models", i, "parameters"))
                self.path_map[("operations", 0, "merge", "models", name)] = ("models", i, "parameters")
            op = {**common, "models": entries, "parameters": global_params}
            if base:
                op["base"] = base
            operations.append({"merge": op})
            self.path_map[("operations", 0, "merge", "parameters")] = ("parameters",)
            self.path_map[("operations", 0, "merge")] = ("merge_method",)
            recipient = base or next(iter(entries))
        else:
            operations, recipe["stack"], recipient = self.slices(d["slices"], base, global_params, common, spec)
        recipe["recipient"] = recipient
        recipe["operations"] = operations
        if out_dtype or compute_dtype:
            out = out_dtype or compute_dtype
            if out == "float64":
                raise self.error(("out_dtype" if out_dtype else "dtype",), "float64 output is not supported")
            recipe["output"] = {"dtype": out}
        tok = d.get("tokenizer_source")
        if tok is not None:
            if tok == "union":
                raise self.error(("tokenizer_source",), "tokenizer_source: union (a merged vocabulary that "
                                 "permutes embedding rows) is not supported; use 'base' or a model name")
            if tok == "base":
                if not base:
                    raise self.error(("tokenizer_source",), "tokenizer_source: base needs a base_model")
                tok_name = base
            elif tok in self.names:
                tok_name = self.names[tok]
            else:
                raise self.error(("tokenizer_source",), f"tokenizer_source {tok!r} is not one of the config's "
                                 f"models ({', '.join(self.names)}), 'base' or 'union'")
            recipe.setdefault("output", {})["tokenizer_from"] = tok_name
        return recipe

    def slices(self, slices, base, global_params, common, spec):
        if not isinstance(slices, list):
            raise self.error(("slices",), "slices must be a list of {sources: [...]}")
        stack, per_slice = [], []
        out_start = 0
        base_policy = spec.contract.base.value
        for i, sl in enumerate(slices):
            path = ("slices", i)
            self.check_keys(sl, SLICE_KEYS, path, "a slice")
            if sl.get("residual_weight") is not None:
                raise self.error(path + ("residual_weight",), "residual_weight is not supported")
            sources = sl.get("sources")
            if not isinstance(sources, list) or not sources:
                raise self.error(path + ("sources",), "a slice needs a non-empty list of sources")
            names, ranges, params = [], [], {}
            for j, src in enumerate(sources):
                spath = path + ("sources", j)
                self.check_keys(src, SOURCE_KEYS, spath, "a slice source")
                for key in ("model", "layer_range"):
                    if key not in src:
                        raise self.error(spath, f"missing required key {key!r}")
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
            shared = _chain(self.parameters(sl.get("parameters"), path + ("parameters",)), global_params)
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
                self.path_map[("operations", k, "merge", "models", nm)] = ("slices", slice_index, "sources", j,
                                                                         "parameters")
            self.path_map[("operations", k, "merge", "parameters")] = ("slices", slice_index, "parameters")
            self.path_map[("operations", k, "merge")] = ("slices", slice_index)
            operations.append({"merge": op})

        first, last = per_slice[0], per_slice[-1]
        merge(first[0], first[1], first[2], first[3], {"modules": ["embed"]}, first[6])
        merge(last[0], last[1], last[2], last[3], {"modules": ["final_norm", "lm_head"]}, last[6])
        for names, params, slice_base, shared, start, n, i in per_slice:
            merge(names, params, slice_base, shared, {"layers": f"{start}-{start + n - 1}"}, i)
        return operations, stack, base or per_slice[0][0][0]


def _chain(first: dict, then: dict) -> dict:
    """Two parameter scopes as one: where both set a key, first's conditions come before then's.

    mergekit tries scopes in order and takes the first whose filters match; a list of
    {value, filter} conditions is tried the same way, so concatenating them is equivalent.
    """
    out = dict(then)
    for key, value in first.items():
        if key in then:
            out[key] = _conditions(value) + _conditions(then[key])
        else:
            out[key] = value
    return out


def _conditions(value) -> list:
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return list(value)
    return [{"value": value}]


def translate(data: dict, source: str | None = None, lines: dict | None = None) -> tuple[dict, dict]:
    """A mergekit config dict -> (recipe dict, recipe path prefix -> config path) for error messages."""
    t = _Translator(data, source, lines or {})
    return t.translate(), t.path_map
