"""The schema of search files: the objective terms, the settings, and the loaded ``Search``."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from surgery.errors import RecipeError
from surgery.search.space import Variable, resolve

SAMPLERS = ("tpe", "cmaes", "random", "grid")
PRUNERS = ("none", "median", "halving", "hyperband")
DEFAULT_FIDELITY = [0.125, 0.25, 0.5, 1.0]  # with a pruner and no fidelity: 1/8, 1/4, 1/2, all
# what the built-in evaluators measure (surgery eval); lm-eval metrics are written task:metric
METRICS = ("perplexity", "bits_per_byte", "exact_match", "numeric_match", "acc", "acc_norm")


class Term(BaseModel):
    """One part of the objective: weight × metric on a data set."""

    model_config = ConfigDict(extra="forbid")
    data: str | None = Field(None, description="Local data file (as for `surgery eval --data`), relative to the search "
                                               "file.")
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
    eval: dict[str, Any] = Field(default_factory=dict,
                                 description="Options for the evaluator (limit, batch_size, ...).")
    pruner: Literal["none", "median", "halving", "hyperband"] = Field(
        "none", description="Optuna pruner that stops bad trials at a fidelity step: median, halving "
                            "(successive halving), hyperband.")
    fidelity: list[float] | None = Field(
        None, description="Growing fractions of each data set a trial is measured on, ending at 1 (default with "
                          "a pruner: [0.125, 0.25, 0.5, 1]; without: [1]).")


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
    datasets: dict = field(default_factory=dict, repr=False)
    pruner: str = "none"
    fidelity: list = field(default_factory=lambda: [1.0])
    initial: dict | None = None  # parameter values to try first (a mergekit-evolve genome's starting point)

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
        nested = [a for a in typing.get_args(annotation) or (annotation,)
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        nested += [b for a in typing.get_args(annotation) for b in typing.get_args(a)
                   if isinstance(b, type) and issubclass(b, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def check_fidelity(settings: SearchFile, where) -> list[float]:
    """The fidelity steps of a search file: increasing fractions in (0, 1] ending at 1; more than one with a pruner."""
    if settings.fidelity is None:
        return list(DEFAULT_FIDELITY) if settings.pruner != "none" else [1.0]
    steps = [float(f) for f in settings.fidelity]
    increasing = all(a < b for a, b in zip(steps, steps[1:]))
    if not steps or steps[-1] != 1 or any(not 0 < f <= 1 for f in steps) or not increasing:
        raise RecipeError(f"fidelity {settings.fidelity}: expected increasing fractions in (0, 1] ending at 1, "
                          "e.g. [0.125, 0.25, 0.5, 1]", where(("fidelity",)))
    if settings.pruner != "none" and len(steps) < 2:
        raise RecipeError(f"pruner {settings.pruner} needs at least two fidelity steps to prune between "
                          "(e.g. fidelity: [0.25, 1])", where(("pruner",)))
    if len(steps) > 1 and any(t.lm_eval for t in settings.objective):
        raise RecipeError("fidelity steps measure local data files; an lm_eval term is measured whole: "
                          "use fidelity: [1] (or no pruner) with lm_eval terms", where(("fidelity",)))
    return steps


def check_term(term: Term, at: str) -> None:
    if (term.data is None) == (term.lm_eval is None):
        raise RecipeError("an objective term names either a data file (data:) or an lm-eval task (lm_eval:)", at)
    if term.data is not None and term.metric not in METRICS:
        hint = difflib.get_close_matches(term.metric, METRICS, n=1, cutoff=0.5)
        raise RecipeError(f"unknown metric {term.metric!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                          + f" (metrics: {', '.join(METRICS)})", at)
