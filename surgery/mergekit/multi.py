"""Multi-stage mergekit configs (mergekit-multi): several YAML documents, each a mergekit config with a
``name:``, where a later stage names an earlier one as a model.

    stages = load_stages("multi.yml")      # in the order they must run; the last one is the output
    stages[0].name, stages[0].needs        # 'slerped', set()

A stage is named by ``name:`` (mergekit-multi) or by ``out_path:`` (the older multi-document format
of mergekit's examples/mega.yml, where later stages name the earlier one by that path). The output
is the unnamed stage, else the stage no other stage uses. Every reference to a stage (a model,
``base_model``, ``tokenizer_source``, a ``base+lora`` reference) is replaced by the folder that
stage is written to, as mergekit-multi replaces it by its intermediate folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import RecipeError

STAGE_KEYS = ("name", "out_path")


@dataclass
class Stage:
    name: str | None
    data: dict
    lines: dict
    needs: set[str] = field(default_factory=set)

    def applies_lora_to_stage(self) -> bool:
        """True if a reference 'stage+lora' applies an adapter to another stage's output."""
        return any(_lora_on(v, self.needs) for v in _strings(self.data))

    def with_outputs(self, folders: dict[str, Path]) -> dict:
        """The stage's config with every reference to another stage replaced by that stage's folder."""
        return _replace(self.data, {n: str(p) for n, p in folders.items()})


def is_multi_document(text: str) -> bool:
    """True for a YAML text with several documents (composed only: aliases are not expanded here)."""
    import yaml

    try:
        return sum(1 for node in yaml.compose_all(text, Loader=yaml.SafeLoader) if node is not None) > 1
    except (yaml.YAMLError, RecursionError):
        return False  # the single-document parser reports it


def load_stages(text: str, source: str) -> list[Stage]:
    """The stages of a multi-document config, checked as recipes are (plain YAML, bounded aliases)."""
    import yaml

    from surgery.recipe.locations import _Budget, _mark, _problem, index_lines

    try:
        nodes = [n for n in yaml.compose_all(text, Loader=yaml.SafeLoader) if n is not None]
        budget = _Budget()
        indexes = []
        for node in nodes:
            lines: dict = {}
            index_lines(node, (), lines, source, budget)
            indexes.append(lines)
        docs = [d for d in yaml.load_all(text, Loader=yaml.SafeLoader) if d is not None]
    except yaml.YAMLError as e:
        raise RecipeError(f"invalid YAML: {_problem(e)}", _mark(e, source)) from None
    except RecursionError:
        raise RecipeError("YAML nested too deeply", source) from None
    stages, first_line = [], {}
    for lines, doc in zip(indexes, docs):
        if not isinstance(doc, dict):
            raise RecipeError("each document of a multi-stage config is a mergekit config", f"{source}:{lines[()]}")
        keys = [k for k in STAGE_KEYS if doc.get(k) is not None]
        name = str(doc[keys[0]]) if keys else None
        line = lines.get((keys[0],), lines[()]) if keys else lines[()]
        if name in first_line:
            what = f"stage {name!r}" if name else "an unnamed stage (the output)"
            raise RecipeError(f"{what} is defined twice (first on line {first_line[name]})", f"{source}:{line}")
        first_line[name] = line
        stages.append(Stage(name, {k: v for k, v in doc.items() if k not in STAGE_KEYS}, lines))
    names = {s.name for s in stages if s.name}
    for s in stages:
        s.needs = _references(s.data, names)
    return _order(stages, source)


def _order(stages: list[Stage], source: str) -> list[Stage]:
    """The stages the output needs, dependencies first; the output last."""
    by_name = {s.name: s for s in stages}
    used = {n for s in stages for n in s.needs}
    final = by_name.get(None) or next((s for s in reversed(stages) if s.name not in used), None)
    if final is None:
        raise RecipeError("the stages use each other in a cycle; one stage must be the output", source)
    ordered: list[Stage] = []
    visiting: list[str] = []

    def visit(stage: Stage):
        if stage in ordered:
            return
        if stage.name in visiting:
            cycle = " -> ".join(visiting[visiting.index(stage.name):] + [stage.name])
            raise RecipeError(f"the stages use each other in a cycle: {cycle}", f"{source}:{stage.lines[()]}")
        visiting.append(stage.name)
        for n in sorted(stage.needs):
            visit(by_name[n])
        visiting.pop()
        ordered.append(stage)

    visit(final)
    return ordered


def _strings(value):
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _lora_on(value: str, names) -> bool:
    return "+" in value and _is_ref_to(value, names) is not None


def _is_ref_to(value: str, names) -> str | None:
    head = value.split("+", 1)[0].split("@", 1)[0]
    return head if head in names else None


def _references(value, names) -> set[str]:
    if isinstance(value, dict):
        return {n for v in value.values() for n in _references(v, names)}
    if isinstance(value, list):
        return {n for v in value for n in _references(v, names)}
    if isinstance(value, str) and _is_ref_to(value, names):
        return {_is_ref_to(value, names)}
    return set()


def _replace(value, folders: dict[str, str]):
    """mergekit-multi's patch: a string whose model path is a stage name -> that stage's folder."""
    if isinstance(value, dict):
        return {k: _replace(v, folders) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace(v, folders) for v in value]
    if isinstance(value, str):
        name = _is_ref_to(value, folders)
        if name is not None:
            return folders[name] + value[len(name):]
    return value
