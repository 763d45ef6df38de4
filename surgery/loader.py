"""Loading recipes: YAML (or a dict) -> a validated ``Recipe``, with errors that point at the YAML line.

    recipe = load_recipe("recipes/layer_swap.yaml")
    recipe.operations[0]           # LayerSwap(donor='sw', bottom=2, ...)

mergekit configs are recognised and translated into recipes (surgery.mergekit.config).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from surgery.errors import RecipeError, did_you_mean
from surgery.io.files import read_text
from surgery.operations import OPERATIONS
from surgery.recipe.locations import MAX_RECIPE_BYTES, parse_yaml, where
from surgery.mergekit.config import is_mergekit_config, translate
from surgery.recipe.schema import AdapterInput, Recipe



@dataclass(frozen=True)
class Stages:
    """A multi-stage mergekit config (several YAML documents), as read: `surgery run` runs it stage by stage."""

    text: str
    source: str


def load_recipe(source: str | Path | dict, *, base_dir: Path | None = None, mergekit_lenient: bool = False) -> Recipe:
    """Parse and validate a recipe from a YAML file path, a YAML string, or a dict.

    ``mergekit_lenient``: a mergekit config runs as mergekit runs it, its unknown keys and parameters
    ignored with a warning (by default they are errors: a typo would silently change the merge)."""
    recipe = read_recipe(source, base_dir=base_dir, mergekit_lenient=mergekit_lenient)
    if isinstance(recipe, Stages):
        raise RecipeError("a multi-stage mergekit config (several YAML documents): `surgery run` runs it "
                          "stage by stage; a later stage can be planned once the stages it uses are "
                          "written", recipe.source)
    return recipe


def read_recipe(source: str | Path | dict, *, base_dir: Path | None = None,
                mergekit_lenient: bool = False) -> Recipe | Stages:
    """``load_recipe``, except that a multi-stage mergekit config is returned as ``Stages`` (its text, read once)
    instead of refused: what `surgery run` takes."""
    text, name, lines = None, None, {}
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source) if not (isinstance(source, str) and "\n" in source) else None
        if path is not None:
            if not os.path.lexists(path):
                raise RecipeError(f"recipe file not found: {path}")
            text = read_text(path, max_bytes=MAX_RECIPE_BYTES)
            name, base_dir = str(path), base_dir or path.resolve().parent
        else:
            text, name = str(source), "<recipe>"
            if len(text) > MAX_RECIPE_BYTES:
                raise RecipeError(f"recipe text is {len(text)} characters; larger than the "
                                  f"{MAX_RECIPE_BYTES}-byte limit", name)
        if "\n---" in text or text.startswith("---"):
            from surgery.mergekit.multi import is_multi_document

            if is_multi_document(text):
                return Stages(text, name)
        data, lines = parse_yaml(text, name)
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a YAML mapping with 'inputs' and 'operations'", name)
    if is_mergekit_config(data):  # a mergekit config runs unchanged (see mergekit/config.py)
        return load_mergekit(data, name, lines, text, lenient=mergekit_lenient)
    declared = data.get("inputs")
    for key, spec in (declared.items() if isinstance(declared, dict) else []):
        if isinstance(spec, dict):  # an adapter: report its own errors, not the union's
            _validate(AdapterInput, spec, ("inputs", key), name, lines)
    recipe = _validate(Recipe, data, (), name, lines)
    recipe.operations = [_validate_operation(op, i, name, lines) for i, op in enumerate(recipe.operations)]
    recipe._source, recipe._lines, recipe._text, recipe._base_dir = name, lines, text, base_dir
    _check_names(recipe)
    return recipe


def load_mergekit(data: dict, source: str | None, lines: dict, text: str | None = None, *,
                  lenient: bool = False) -> Recipe:
    """A mergekit config (one document) as a validated recipe; errors point at the config's own lines."""
    data, path_map = translate(data, source, lines, lenient=lenient)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
        mapped = next((path_map[loc[:n]] + loc[n:] for n in range(len(loc), 0, -1) if loc[:n] in path_map), loc)
        raise RecipeError(_explain(Recipe, err, loc), where(source, lines, mapped)) from None
    recipe.operations = [_validate_operation(op, i, source, {}) for i, op in enumerate(recipe.operations)]
    recipe._source, recipe._lines, recipe._text, recipe._path_map = source, lines, text, path_map
    recipe._base_dir = None  # mergekit resolves model paths against the working directory
    _check_names(recipe)
    return recipe


def _validate(model: type[BaseModel], data, prefix, source, lines):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        err = errs[0]
        if err["type"] == "missing":  # a misspelt key gives 'missing' + 'unknown key': the latter has the hint
            err = next((x for x in errs if x["type"] == "extra_forbidden" and x["loc"][:-1] == err["loc"][:-1]), err)
        loc = prefix + tuple(p for p in err["loc"] if not _is_union_tag(p))
        raise RecipeError(_explain(model, err, loc[len(prefix):]), where(source, lines, loc)) from None


def _is_union_tag(p) -> bool:
    return isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool", "list", "literal"))


def _explain(model, err, loc) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = _fields_at(model, loc[:-1])
        key = str(loc[-1])
        msg = f"unknown key {key!r}" + did_you_mean(key, valid)
        return msg + f" (valid keys: {', '.join(sorted(valid))})" if valid else msg
    if kind == "missing":
        return f"missing required key {str(loc[-1])!r}"
    got = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(got, dict) or repr(got) in msg:  # our validators already name the value
        return msg
    return f"{msg} (got {got!r})"


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
    known = OPERATIONS
    if not isinstance(op, dict) or len(op) != 1:
        raise RecipeError(f"each operation is a mapping with one key, the operation name "
                          f"({', '.join(known)})", where(source, lines, path))
    (name, body), = op.items()
    if name not in known:
        msg = f"unknown operation {name!r}" + did_you_mean(name, known)
        raise RecipeError(msg + f" (valid: {', '.join(known)})", where(source, lines, path + (name,)))
    model = known[name]
    return _validate(model, body if body is not None else {}, path + (name,), source, lines)


def _check_names(recipe: Recipe) -> None:
    """Every input a recipe mentions must be declared under inputs."""
    if not recipe.inputs:
        raise recipe.error(("inputs",), "at least one input is required")

    def check(name, path):
        if name not in recipe.inputs:
            raise recipe.error(path, f"unknown input {name!r}" + did_you_mean(name, recipe.inputs)
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
    tok = recipe.tokenizer
    if tok is not None:
        if tok.source not in ("union", "base"):
            check(tok.source, ("tokenizer", "source"))
        if tok.base:
            check(tok.base, ("tokenizer", "base"))
        for token, cfg in (tok.tokens or {}).items():
            src = cfg.source
            name = src if isinstance(src, str) else getattr(src, "model", None)
            if name is not None:
                check(name, ("tokenizer", "tokens", token, "source"))
    for i, seg in enumerate(recipe.stack or []):
        for n, field in ([(seg.from_, "from")] if seg.from_ else []) + [(n, "sources") for n in seg.sources or {}]:
            check(n, ("stack", i, field) + ((n,) if field == "sources" else ()))
    for i, op in enumerate(recipe.operations):
        path = ("operations", i, op.op_name)
        for field, names in op.input_refs().items():
            for n in names:
                check(n, path + (field,))


def json_schema() -> dict:
    """JSON Schema of the recipe format (for editor autocompletion)."""
    rules = [create_model(f"{name}_operation", __config__=ConfigDict(extra="forbid"),
                          **{name: (model, ...)}) for name, model in OPERATIONS.items()]
    full = create_model("SurgeryRecipe", __base__=Recipe,
                        operations=(list[Union[tuple(rules)]], Field(default_factory=list, description=Recipe.model_fields["operations"].description)))
    schema = full.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "surgery recipe"
    return schema
