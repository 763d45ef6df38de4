"""Search files: a recipe with search variables, an objective, a budget, a sampler.

    recipe:
      inputs: {math: ckpt/math, sw: ckpt/sw}
      recipient: math
      operations:
        - layer_swap: {donor: sw, bottom: {int: [0, 8]}, top: {int: [0, 4]}}
    objective:
      - {data: texts/sw.txt, metric: bits_per_byte, weight: -1}
    trials: 30
    sampler: tpe

A mergekit-evolve config (``genome:`` + ``tasks:``) is read as a search too (see genome.py).
Every problem is reported once, here, with the file and line.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from surgery.errors import RecipeError
from surgery.search.space import Variable, find_variables, resolve, substitute, with_layer_groups

SAMPLERS = ("tpe", "cmaes", "random", "grid")
# what the built-in evaluators measure (surgery eval); lm-eval metrics are written task:metric
METRICS = ("perplexity", "bits_per_byte", "exact_match", "numeric_match", "acc", "acc_norm")


class Term(BaseModel):
    """One part of the objective: weight × metric on a data set."""

    model_config = ConfigDict(extra="forbid")
    data: str | None = Field(None, description="Local data file (as for `surgery eval --data`), relative to the search file.")
    lm_eval: str | None = Field(None, description="An lm-evaluation-harness task instead of a local file.")
    metric: str = Field(description="perplexity, bits_per_byte, exact_match, numeric_match, acc, acc_norm; "
                                    "for lm_eval tasks the task's metric ('acc,none').")
    weight: float = Field(1.0, description="Weight in the objective (which is maximised): negative for "
                                           "lower-is-better metrics such as perplexity.")


class SearchFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str | None = None
    recipe: dict[str, Any] = Field(description="A recipe whose values may be search variables.")
    objective: list[Term] = Field(min_length=1, description="Weighted data/metric pairs, summed and maximised.")
    trials: int = Field(20, ge=1, description="Trials in the study (a resumed study counts the finished ones).")
    sampler: Literal["tpe", "cmaes", "random", "grid"] = "tpe"
    seed: int = Field(0, description="Sampler seed.")
    eval: dict[str, Any] = Field(default_factory=dict, description="Options for the evaluator (limit, batch_size, ...).")


@dataclass
class Search:
    """A loaded search: the recipe data, its variables, and the settings."""

    recipe: dict
    variables: list[Variable]
    objective: list[Term]
    trials: int = 20
    sampler: str = "tpe"
    seed: int = 0
    eval: dict = field(default_factory=dict)
    base_dir: Path = field(default_factory=Path.cwd)
    source: str = "<search>"
    description: str | None = None
    n_layers: int = 0
    datasets: dict = field(default_factory=dict, repr=False)  # loaded once here; the serial worker reuses them

    def resolve(self, sampled: dict) -> dict:
        """The plain recipe dict for sampled values (optuna param name -> value)."""
        return resolve(self.recipe, self.variables, sampled)

    def param_names(self) -> list[str]:
        return [n for v in self.variables for n in v.param_names()]

    def grid_space(self) -> dict[str, list]:
        return {n: v.grid() for v in self.variables for n in v.param_names()}

    def distributions(self) -> dict:
        return {n: v.distribution() for v in self.variables for n in v.param_names()}

    def grid_size(self) -> int:
        size = 1
        for values in self.grid_space().values():
            size *= len(values)
        return size


def parse_yaml(text: str, name: str):
    """(data, {path: line}) of a YAML text, duplicate keys rejected."""
    from surgery.recipe.locations import parse_yaml as parse

    return parse(text, name)


def where_in(source: str, lines: dict):
    from surgery.recipe.locations import where

    return lambda path: where(source, lines, path)


def load_search(source: str | Path | dict, *, base_dir: Path | None = None) -> Search:
    """Read and check a search file (path, YAML text or dict): schema, variables, and the recipe
    with every variable at each of its ends (or choices), so a bad value fails here, not in trial 17."""
    lines, name = {}, "<search>"
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source) if not (isinstance(source, str) and "\n" in source) else None
        if path is not None and not path.exists():
            raise RecipeError(f"search file not found: {path}")
        text, name = (path.read_text(), str(path)) if path is not None else (str(source), "<search>")
        base_dir = base_dir or (path.resolve().parent if path is not None else None)
        data, lines = parse_yaml(text, name)
    where = where_in(name, lines)
    base_dir = Path(base_dir or Path.cwd())
    if not isinstance(data, dict):
        raise RecipeError("a search file is a YAML mapping with 'recipe' and 'objective'", name)
    if "genome" in data:
        from surgery.search.genome import genome_search

        return genome_search(data, where, base_dir, name)
    for key in data:
        if key != "recipe" and find_variables(data[key], where, (key,)):
            raise RecipeError("search variables go inside the recipe; this setting takes a fixed value",
                              find_variables(data[key], where, (key,))[0].where)
    settings = validate_settings(data, where)
    return build_search(settings.recipe, settings.objective, where, base_dir, name,
                        trials=settings.trials, sampler=settings.sampler, seed=settings.seed,
                        eval=settings.eval, description=settings.description)


def validate_settings(data: dict, where) -> SearchFile:
    settings = validate_model(SearchFile, data, where)
    for i, term in enumerate(settings.objective):
        check_term(term, where(("objective", i)))
    return settings


def validate_model(model: type[BaseModel], data: dict, where):
    """``model.model_validate(data)``, with the first error as one line at its place in the file."""
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "list"))))
        if err["type"] == "extra_forbidden":
            valid = fields_at(model, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            msg = f"unknown key {loc[-1]!r}" + (f"; did you mean {hint[0]!r}?" if hint else "") + \
                f" (valid keys: {', '.join(valid)})"
        elif err["type"] == "missing":
            msg = f"missing required key {str(loc[-1])!r}"
        else:
            msg = err["msg"] + (f" (got {err['input']!r})" if not isinstance(err.get("input"), (dict, list)) else "")
        raise RecipeError(msg, where(loc)) from None


def fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys of the nested model at ``loc`` (list indices skipped)."""
    import typing

    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        nested = [a for a in typing.get_args(annotation) or (annotation,) if isinstance(a, type) and issubclass(a, BaseModel)]
        nested += [b for a in typing.get_args(annotation) for b in typing.get_args(a)
                   if isinstance(b, type) and issubclass(b, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def check_term(term: Term, at: str) -> None:
    if (term.data is None) == (term.lm_eval is None):
        raise RecipeError("an objective term names either a data file (data:) or an lm-eval task (lm_eval:)", at)
    if term.data is not None and term.metric not in METRICS:
        hint = difflib.get_close_matches(term.metric, METRICS, n=1, cutoff=0.5)
        raise RecipeError(f"unknown metric {term.metric!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                          + f" (metrics: {', '.join(METRICS)})", at)


def build_search(recipe: dict, objective: list[Term], where, base_dir: Path, name: str, **settings) -> Search:
    variables = find_variables(recipe, where, ("recipe",))
    variables = [Variable(**{**v.__dict__, "path": v.path[1:]}) for v in variables]  # paths within the recipe
    check_layer_variables(recipe, variables)
    check_in_schema(recipe, variables, where, base_dir)
    search = Search(recipe, variables, objective, base_dir=base_dir, source=name, **settings)
    if any(v.layer_granularity for v in variables):
        search.n_layers = count_layers(search)
        search.variables = with_layer_groups(variables, search.n_layers)
    if search.sampler == "grid":
        search.grid_space()  # a float without a step fails here
    from surgery.search.objective import check_eval_options, load_objective_data

    check_eval_options(search.eval, where)
    search.datasets = load_objective_data(objective, base_dir, search.eval, where)
    return search


def check_layer_variables(recipe: dict, variables: list[Variable]) -> None:
    """Per-layer variables go in an operation that takes a selection, one granularity per operation."""
    from surgery.operations import OPERATIONS as known
    by_op: dict[int, int] = {}
    for v in variables:
        if not v.layer_granularity:
            continue
        p = v.path
        if len(p) < 3 or p[0] != "operations" or not isinstance(p[1], int):
            raise RecipeError("layer_granularity applies to operation parameters (under operations:)", v.where)
        model = known.get(p[2])
        if model is None or "select" not in model.model_fields:
            raise RecipeError(f"layer_granularity needs an operation with a 'select' ({p[2]} has none)", v.where)
        body = recipe["operations"][p[1]][p[2]] or {}
        if isinstance(body.get("select"), dict) and "layers" in body["select"]:
            raise RecipeError("layer_granularity splits all layers into groups; remove select.layers from "
                              "this operation", v.where)
        if by_op.setdefault(p[1], v.layer_granularity) != v.layer_granularity:
            raise RecipeError(f"one layer_granularity per operation ({by_op[p[1]]} and {v.layer_granularity})",
                              v.where)


def check_in_schema(recipe: dict, variables: list[Variable], where, base_dir: Path) -> None:
    """Validate the recipe with each variable at each of its corner values (others at their first)."""
    from surgery.recipe.loader import load_recipe

    first = {v.path: v.corners()[0] for v in variables}
    trials = [dict(first)] + [{**first, v.path: c} for v in variables for c in v.corners()[1:]]
    for values in trials:
        try:
            load_recipe(substitute(recipe, values), base_dir=base_dir)
        except RecipeError as e:
            path = error_path(e)
            culprit = next((v for v in variables if path[:len(v.path)] == v.path), None)
            message = str(e)[len(e.where) + 2:] if e.where else str(e)
            if culprit is not None:
                raise RecipeError(f"search variable cannot go here ({culprit.kind} value "
                                  f"{values[culprit.path]!r}): {message}", culprit.where) from None
            raise RecipeError(message, where(("recipe",) + path)) from None


def error_path(e: RecipeError) -> tuple:
    """The recipe path of a load_recipe error on a dict ('recipe: operations.0.layer_swap.bottom')."""
    if not e.where or ": " not in e.where:
        return ()
    loc = e.where.split(": ", 1)[1]
    if loc == "(top level)":
        return ()
    return tuple(int(p) if p.lstrip("-").isdigit() else p for p in loc.split("."))


def count_layers(search: Search) -> int:
    """The recipient's layer count (per-layer variables are grouped over it)."""
    from surgery.pipeline import build_plan
    from surgery.recipe.loader import load_recipe

    plain = {v.path: v.corners()[0] for v in search.variables}
    plan = build_plan(load_recipe(substitute(search.recipe, plain), base_dir=search.base_dir))
    for ck in plan.inputs.values():
        ck.close()
    return len(plan.layer_map)
