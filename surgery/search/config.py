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

from pathlib import Path

from surgery.errors import RecipeError
from surgery.search.schema import Search, SearchFile, Term, check_fidelity, check_term, validate_model
from surgery.search.space import Variable, find_variables, substitute, with_layer_groups


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
        from surgery.search.genome import genome_settings

        recipe, objective, recipe_where, settings, initial = genome_settings(data, where, base_dir)
        spec = build_search(recipe, objective, recipe_where, base_dir, name, **settings)
        spec.initial = initial(spec)
        return spec
    for key in data:
        if key != "recipe" and find_variables(data[key], where, (key,)):
            raise RecipeError("search variables go inside the recipe; this setting takes a fixed value",
                              find_variables(data[key], where, (key,))[0].where)
    settings = validate_settings(data, where)
    return build_search(settings.recipe, settings.objective, where, base_dir, name,
                        trials=settings.trials, sampler=settings.sampler, seed=settings.seed,
                        eval=settings.eval, description=settings.description, pruner=settings.pruner,
                        fidelity=check_fidelity(settings, where))


def validate_settings(data: dict, where) -> SearchFile:
    settings = validate_model(SearchFile, data, where)
    for i, term in enumerate(settings.objective):
        check_term(term, where(("objective", i)))
    return settings


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
    from surgery.loader import load_recipe

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
                raise RecipeError(f"the {culprit.kind} variable's value {values[culprit.path]!r} is not valid "
                                  f"here: {message}", culprit.where) from None
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
    from surgery.loader import load_recipe

    plain = {v.path: v.corners()[0] for v in search.variables}
    plan = build_plan(load_recipe(substitute(search.recipe, plain), base_dir=search.base_dir))
    for ck in plan.inputs.values():
        ck.close()
    return len(plan.layer_map)
