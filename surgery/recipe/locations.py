"""Where things are in a YAML file: a line index by key path, for errors that point at the line.

    data, lines = parse_yaml(text, "recipe.yaml")
    where("recipe.yaml", lines, ("operations", 0, "layer_swap", "top"))   # 'recipe.yaml:7: operations.0...'
"""

from __future__ import annotations

import yaml

from surgery.errors import RecipeError

MAX_RECIPE_BYTES = 4 << 20  # a recipe is a few KB; neuron lists make it larger, never megabytes


MAX_DEPTH = 50  # a recipe nests a few levels; deeper input would only exhaust the recursion limit
MAX_ALIAS_NODES = 100_000  # nodes reached through aliases; a 1 KB "billion laughs" reaches billions
SAFE_TAGS = {f"tag:yaml.org,2002:{t}" for t in
             ("str", "int", "float", "bool", "null", "map", "seq", "timestamp", "binary", "merge", "set", "omap",
              "pairs", "value")}


def parse_yaml(text: str, name: str):
    """(data, line index) of a YAML recipe: plain YAML only (tags other than the standard ones, such as
    ``!!python/object``, are refused with their line), and alias expansion is bounded."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise RecipeError(f"invalid YAML: {_problem(e)}", _mark(e, name)) from None
    except RecursionError:
        raise RecipeError(f"YAML nested deeper than {MAX_DEPTH} levels", name) from None
    lines: dict[tuple, int] = {}
    if node is None:
        return None, lines
    index_lines(node, (), lines, name, _Budget())
    try:
        return yaml.SafeLoader(text).get_single_data(), lines
    except yaml.YAMLError as e:
        raise RecipeError(f"invalid YAML: {_problem(e)}", _mark(e, name)) from None


class _Budget:
    """Counts node visits beyond the first one of each node (alias expansions)."""

    def __init__(self):
        self.seen, self.extra = set(), 0


def index_lines(node, path, lines, name, budget=None):
    budget = budget or _Budget()
    if id(node) in budget.seen:
        budget.extra += 1
        if budget.extra > MAX_ALIAS_NODES:
            raise RecipeError(f"YAML aliases expand to more than {MAX_ALIAS_NODES} nodes; "
                              "refused (an alias bomb?)", f"{name}:{node.start_mark.line + 1}")
    budget.seen.add(id(node))
    if len(path) > MAX_DEPTH:
        raise RecipeError(f"YAML nested deeper than {MAX_DEPTH} levels", f"{name}:{node.start_mark.line + 1}")
    if node.tag not in SAFE_TAGS:
        raise RecipeError(f"unsupported YAML tag {_short_tag(node.tag)!r}; recipes are plain YAML",
                          f"{name}:{node.start_mark.line + 1}")
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                raise RecipeError("a mapping key must be a plain value, not a list or mapping",
                                  f"{name}:{k.start_mark.line + 1}")
            if k.tag not in SAFE_TAGS:
                raise RecipeError(f"unsupported YAML tag {_short_tag(k.tag)!r}; recipes are plain YAML",
                                  f"{name}:{k.start_mark.line + 1}")
            if k.value in seen:
                raise RecipeError(f"duplicate key {k.value!r}", f"{name}:{k.start_mark.line + 1}")
            seen.add(k.value)
            key = k.value
            lines[path + (key,)] = k.start_mark.line + 1
            index_lines(v, path + (key,), lines, name, budget)
            lines[path + (key,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            index_lines(v, path + (i,), lines, name, budget)


def _short_tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:"):] if tag.startswith("tag:yaml.org,2002:") else tag


def _problem(e) -> str:
    text = getattr(e, "problem", None) or str(e)
    return str(text).strip().splitlines()[0]


def _mark(e, name: str) -> str:
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        return f"{name}:{mark.line + 1}"
    return name


def where(source, lines, path) -> str:
    path = tuple(path)
    line = None
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            line = lines[path[:n]]
            break
    loc = ".".join(str(p) for p in path) or "(top level)"
    head = f"{source}:{line}" if source and line else (source or "recipe")
    return f"{head}: {loc}"
