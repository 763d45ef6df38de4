"""Where things are in a YAML file: a line index by key path, for errors that point at the line.

    data, lines = parse_yaml(text, "recipe.yaml")
    where("recipe.yaml", lines, ("operations", 0, "layer_swap", "top"))   # 'recipe.yaml:7: operations.0...'
"""

from __future__ import annotations

import yaml

from surgery.errors import RecipeError


def parse_yaml(text: str, name: str):
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        raise RecipeError(f"invalid YAML: {getattr(e, 'problem', e)}", where) from None
    lines: dict[tuple, int] = {}
    if node is not None:
        index_lines(node, (), lines, name)
    return yaml.safe_load(text), lines


def index_lines(node, path, lines, name):
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for k, v in node.value:
            if k.value in seen:
                raise RecipeError(f"duplicate key {k.value!r}", f"{name}:{k.start_mark.line + 1}")
            seen.add(k.value)
            lines[path + (k.value,)] = k.start_mark.line + 1
            index_lines(v, path + (k.value,), lines, name)
            lines[path + (k.value,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            index_lines(v, path + (i,), lines, name)


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
