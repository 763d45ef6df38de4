"""Recipes: YAML -> validated pydantic objects, with errors that point at the YAML line.

    recipe = load_recipe("recipes/layer_swap.yaml")
    recipe.inputs["math"]          # 'path/or/hub-id'
    recipe.operations[0]           # LayerSwap(donor='sw', bottom=2, ...)

A recipe names its inputs, picks a recipient (the default source of every tensor and of the
config), and lists operations. Operations apply in order; when two select the same tensor,
the later one wins. Each operation kind is one pydantic model plus one planner function,
registered together with ``@operation`` (see plan.py for the core four).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from .errors import RecipeError
from .parsing import LayerSpec, parse_expression, parse_layers, parse_size  # noqa: F401  (re-exported)

DTYPES = ("float32", "float16", "bfloat16")
Source = Union[Literal["recipient", "donor"], float]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterInput(Strict):
    """A PEFT adapter directory (LoRA or (IA)³) applied to a base: reads like the merged checkpoint."""

    adapter: str = Field(description="Directory with adapter_config.json and adapter_model.safetensors.")
    base: str = Field(description="The base it applies to: an input name, or a path / Hub id.")


class Operation(Strict):
    """Base of every operation model. ``input_refs`` names the inputs it uses, by field."""

    def input_refs(self) -> dict[str, list[str]]:
        return {}


class Select(Strict):
    """Which tensors an operation applies to. All given criteria must hold; none given = all."""

    layers: LayerSpec | None = Field(None, description="Layer indices: 3, '0-3, 28-31', [0, -1]. Negative counts from the end. Tensors outside layers (embeddings, final norm, lm_head) are never selected by this.")
    modules: list[str] | None = Field(None, description="Module kinds (attn_q, mlp_down, ...) or groups (attn, mlp, norm, embed, lm_head, other).")
    names: list[str] | None = Field(None, description="Tensor-name globs ('*.mlp.*') or regexes prefixed 're:'.")
    exclude: list[str] | None = Field(None, description="Tensor-name globs or 're:' regexes to leave out.")


class Output(Strict):
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(None, description="Output dtype of floating tensors. Default: each tensor keeps the recipient's dtype.")
    shard_size: Union[int, str] = Field("5GB", description="Maximum shard size: bytes, or with a KB/MB/GB suffix.")
    config_from: str | None = Field(None, description="Input whose config.json, generation_config.json and tokenizer files are copied. Default: the recipient.")
    tokenizer_from: str | None = Field(None, description="Input whose tokenizer files are copied instead of config_from's.")

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v):
        parse_size(v)
        return v


class StackSegment(Strict):
    """Output layers built from a range of source layers (changes the layer count).

    ``from`` picks the input whose layers these are (default: the recipient), so a stack can
    build a frankenmerge from several models. ``sources`` gives, for other inputs, the layers
    that line up with these output layers when an operation reads them (e.g. a slerp of
    a's layers 0-3 with b's layers 4-7); inputs not listed use the same indices as ``layers``.
    """

    layers: LayerSpec = Field(description="Source layer indices, in order: '0-15'.")
    from_: str | None = Field(None, alias="from", description="Input these layers come from. Default: the recipient.")
    sources: dict[str, LayerSpec] | None = Field(None, description="Other inputs' source layers for the same output layers: {b: '4-7'}.")
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class LayerSwap(Operation):
    """Bandarkar et al. 2024: the recipient receives its bottom/top layers from a donor."""

    donor: str = Field(description="Input that gives the swapped layers.")
    bottom: int = Field(0, ge=0, description="Number of bottom layers taken from the donor.")
    top: int = Field(0, ge=0, description="Number of top layers taken from the donor.")
    layers: LayerSpec | None = Field(None, description="Explicit donor layers instead of bottom/top: '0-3, 28-31'.")
    transition: int = Field(0, ge=0, description="Width of the blend zone next to each swapped block. Layer at distance d gets donor weight 1 - d/(transition+1).")
    embeddings: Source = Field("recipient", description="Embeddings from recipient, donor, or a float = donor weight in a blend.")
    final_norm: Source = Field("recipient", description="Final norm: recipient, donor, or donor weight.")
    lm_head: Source = Field("recipient", description="lm_head: recipient, donor, or donor weight.")

    def input_refs(self):
        return {"donor": [self.donor]}


class Arithmetic(Operation):
    """A weighted linear combination of inputs: 'math + 1.0*(sw - en)'."""

    expr: str = Field(description="Expression over input names with +, -, scalar * and /, parentheses.")
    select: Select | None = None

    def input_refs(self):
        try:
            return {"expr": list(parse_expression(self.expr))}
        except ValueError:
            return {}  # reported with its line by the planner


class Take(Operation):
    """Copy the selected tensors from one input, byte for byte."""

    from_: str = Field(alias="from", description="Input to copy from.")
    select: Select | None = None
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def input_refs(self):
        return {"from": [self.from_]}


class Blend(Operation):
    """Weighted average of inputs on the selected tensors."""

    weights: dict[str, float] = Field(description="Input name -> weight.")
    normalize: bool = Field(True, description="Divide by the sum of weights.")
    select: Select | None = None

    def input_refs(self):
        return {"weights": list(self.weights)}


# ---------------------------------------------------------------------------- operation registry
# An operation is a pydantic model (its schema) plus a planner (plan.py's Context -> op trees),
# registered together with @operation. Modules listed here register theirs when first needed.
OPERATION_MODULES = ["surgery.plan", "surgery.adapter_ops", "surgery.analysis_ops", "surgery.merge"]
OPERATIONS: dict[str, type[Operation]] = {}
PLANNERS: dict[str, Any] = {}


def operation(name: str, model: type[Operation]):
    """Decorator for a planner function: registers ``name`` with its schema model."""
    def deco(fn):
        if name in OPERATIONS:
            raise ValueError(f"operation {name!r} is already registered")
        OPERATIONS[name], PLANNERS[name] = model, fn
        return fn
    return deco


def operations() -> dict[str, type[Operation]]:
    import importlib

    for module in OPERATION_MODULES:
        importlib.import_module(module)
    return OPERATIONS


class Recipe(Strict):
    description: str | None = Field(None, description="Free text, copied to the manifest.")
    inputs: dict[str, Union[str, AdapterInput]] = Field(description="Name -> local directory, .safetensors file, or Hub id 'org/name[@revision]'; or {adapter: dir, base: input} for a PEFT adapter.")
    recipient: str | None = Field(None, description="Input that gives every tensor no operation selects, and the config. Default: the first input.")
    output: Output = Field(default_factory=Output)
    stack: list[StackSegment] | None = Field(None, description="Output layer order as source-layer ranges; default: the recipient's layers.")
    operations: list[Any] = Field(default_factory=list, description="Operations, applied in order; later ones win.")
    seed: int | None = Field(None, description="Seed for random methods.")

    # filled by load_recipe, not part of the schema
    _source: str | None = None
    _lines: dict = {}
    _text: str | None = None
    _base_dir: Path | None = None
    _path_map: dict = {}  # recipe path prefix -> path in the source file (translated mergekit configs)

    @property
    def recipient_name(self) -> str:
        return self.recipient or next(iter(self.inputs))

    def where(self, path: tuple) -> str:
        path = tuple(path)
        for n in range(len(path), 0, -1):
            if path[:n] in self._path_map:
                path = self._path_map[path[:n]] + path[n:]
                break
        return _where(self._source, self._lines, path)

    def error(self, path: tuple, message: str) -> RecipeError:
        return RecipeError(message, self.where(path))

    def to_yaml(self) -> str:
        if self._text is not None:
            return self._text
        data = self.model_dump(by_alias=True, exclude_none=True, exclude={"operations"})
        data["operations"] = [{operation_name(op): op.model_dump(by_alias=True, exclude_none=True)}
                              for op in self.operations]
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------- loading

def load_recipe(source: str | Path | dict, *, base_dir: Path | None = None) -> Recipe:
    """Parse and validate a recipe from a YAML file path, a YAML string, or a dict."""
    text, name, lines = None, None, {}
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source) if not (isinstance(source, str) and "\n" in source) else None
        if path is not None:
            if not path.exists():
                raise RecipeError(f"recipe file not found: {path}")
            text, name, base_dir = path.read_text(), str(path), base_dir or path.resolve().parent
        else:
            text, name = str(source), "<recipe>"
        data, lines = _parse_yaml(text, name)
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a YAML mapping with 'inputs' and 'operations'", name)
    from .mergekit_config import is_mergekit_config

    if is_mergekit_config(data):  # a mergekit config runs unchanged (see mergekit_config.py)
        from .mergekit_config import translate

        data, path_map = translate(data, name, lines)
        recipe = Recipe.model_validate(data)
        recipe.operations = [_validate_operation(op, i, name, {}) for i, op in enumerate(recipe.operations)]
        recipe._source, recipe._lines, recipe._text, recipe._path_map = name, lines, text, path_map
        recipe._base_dir = None  # mergekit resolves model paths against the working directory
        _check_names(recipe)
        return recipe
    declared = data.get("inputs")
    for key, spec in (declared.items() if isinstance(declared, dict) else []):
        if isinstance(spec, dict):  # an adapter: report its own errors, not the union's
            _validate(AdapterInput, spec, ("inputs", key), name, lines)
    recipe = _validate(Recipe, data, (), name, lines)
    recipe.operations = [_validate_operation(op, i, name, lines) for i, op in enumerate(recipe.operations)]
    recipe._source, recipe._lines, recipe._text, recipe._base_dir = name, lines, text, base_dir
    _check_names(recipe)
    return recipe


def _parse_yaml(text: str, name: str):
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        raise RecipeError(f"invalid YAML: {getattr(e, 'problem', e)}", where) from None
    lines: dict[tuple, int] = {}
    if node is not None:
        _index_lines(node, (), lines, name)
    return yaml.safe_load(text), lines


def _index_lines(node, path, lines, name):
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for k, v in node.value:
            if k.value in seen:
                raise RecipeError(f"duplicate key {k.value!r}", f"{name}:{k.start_mark.line + 1}")
            seen.add(k.value)
            lines[path + (k.value,)] = k.start_mark.line + 1
            _index_lines(v, path + (k.value,), lines, name)
            lines[path + (k.value,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _index_lines(v, path + (i,), lines, name)


def _where(source, lines, path) -> str:
    path = tuple(path)
    line = None
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            line = lines[path[:n]]
            break
    loc = ".".join(str(p) for p in path) or "(top level)"
    head = f"{source}:{line}" if source and line else (source or "recipe")
    return f"{head}: {loc}"


def _validate(model: type[BaseModel], data, prefix, source, lines):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        err = errs[0]
        if err["type"] == "missing":  # a misspelt key gives 'missing' + 'unknown key': the latter has the hint
            err = next((x for x in errs if x["type"] == "extra_forbidden" and x["loc"][:-1] == err["loc"][:-1]), err)
        loc = prefix + tuple(p for p in err["loc"] if not _is_union_tag(p))
        raise RecipeError(_explain(model, err, loc[len(prefix):]), _where(source, lines, loc)) from None


def _is_union_tag(p) -> bool:
    return isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool", "list", "literal"))


def _explain(model, err, loc) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = _fields_at(model, loc[:-1])
        key = str(loc[-1])
        hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        msg = f"unknown key {key!r}"
        if hint:
            msg += f"; did you mean {hint[0]!r}?"
        return msg + f" (valid keys: {', '.join(sorted(valid))})" if valid else msg
    if kind == "missing":
        return f"missing required key {str(loc[-1])!r}"
    got = err.get("input")
    return f"{err['msg']} (got {got!r})" if not isinstance(got, dict) else err["msg"]


def _fields_at(model, loc) -> list[str]:
    """Valid keys of the (nested) model found by following loc from ``model``."""
    import typing

    cls = model
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part) or next((f for f in cls.model_fields.values() if f.alias == part), None)
        if field is None:
            return []
        cls = _model_in(field.annotation, typing)
    if cls is None:
        return []
    return [f.alias or n for n, f in cls.model_fields.items()]


def _model_in(annotation, typing):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg, typing)
        if found:
            return found
    return None


def _validate_operation(op, index, source, lines):
    path = ("operations", index)
    known = operations()
    if not isinstance(op, dict) or len(op) != 1:
        raise RecipeError(f"each operation is a mapping with one key, the operation name "
                          f"({', '.join(known)})", _where(source, lines, path))
    (name, body), = op.items()
    if name not in known:
        hint = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
        msg = f"unknown operation {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
        raise RecipeError(msg + f" (valid: {', '.join(known)})", _where(source, lines, path + (name,)))
    model = known[name]
    return _validate(model, body if body is not None else {}, path + (name,), source, lines)


def operation_name(op: BaseModel) -> str:
    return next(k for k, v in OPERATIONS.items() if isinstance(op, v))


def _check_names(recipe: Recipe) -> None:
    """Every input a recipe mentions must be declared under inputs."""
    if not recipe.inputs:
        raise recipe.error(("inputs",), "at least one input is required")

    def check(name, path):
        if name not in recipe.inputs:
            hint = difflib.get_close_matches(name, recipe.inputs, n=1, cutoff=0.5)
            raise recipe.error(path, f"unknown input {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                               + f" (inputs: {', '.join(recipe.inputs)})")

    for name, spec in recipe.inputs.items():
        if isinstance(spec, AdapterInput) and spec.base in recipe.inputs:
            if spec.base == name or isinstance(recipe.inputs[spec.base], AdapterInput):
                raise recipe.error(("inputs", name, "base"), f"the base of adapter {name!r} must be a checkpoint, "
                                   f"not {'itself' if spec.base == name else 'another adapter'} "
                                   "(stack adapters with apply_adapters)")
    if recipe.recipient:
        check(recipe.recipient, ("recipient",))
    if recipe.output.config_from:
        check(recipe.output.config_from, ("output", "config_from"))
    if recipe.output.tokenizer_from:
        check(recipe.output.tokenizer_from, ("output", "tokenizer_from"))
    for i, seg in enumerate(recipe.stack or []):
        for n, field in ([(seg.from_, "from")] if seg.from_ else []) + [(n, "sources") for n in seg.sources or {}]:
            check(n, ("stack", i, field) + ((n,) if field == "sources" else ()))
    for i, op in enumerate(recipe.operations):
        path = ("operations", i, operation_name(op))
        for field, names in op.input_refs().items():
            for n in names:
                check(n, path + (field,))


def json_schema() -> dict:
    """JSON Schema of the recipe format (for editor autocompletion)."""
    rules = [create_model(f"{name}_operation", __config__=ConfigDict(extra="forbid"),
                          **{name: (model, ...)}) for name, model in operations().items()]
    full = create_model("SurgeryRecipe", __base__=Recipe,
                        operations=(list[Union[tuple(rules)]], Field(default_factory=list, description=Recipe.model_fields["operations"].description)))
    schema = full.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "surgery recipe"
    return schema
