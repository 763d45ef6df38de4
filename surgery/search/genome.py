"""mergekit-evolve configs as searches: the same genotype, through the `merge` operation and lm-eval.

    genome:
      models: [ckpt/math, ckpt/sw]
      merge_method: ties
      base_model: ckpt/base
      layer_granularity: 4
    tasks:
      - {name: my_task, weight: 1.0, metric: "acc,none"}

mergekit-evolve's genotype holds, per layer group (``layer_granularity`` layers; all layers when 0),
per model and per parameter set (one per ``filters`` entry, plus the rest), the method's parameters:
weight (linear, task_arithmetic, ties, dare_ties) and density (ties, dare_ties). It takes |weight|
unless ``allow_negative_weights`` and clamps density to [0, 1]; here the same values are the search
ranges: weight in [0, 1] (or [-1, 1]) and density in [0, 1]. ``normalize`` defaults to true for
linear, ties and dare_ties; the merge runs in bfloat16 with ``int8_mask``. ``smooth`` turns each
parameter into a gradient over the layer groups instead of constant slices. The objective is the
weighted sum of the tasks' metrics, evaluated with lm-evaluation-harness on the in-memory model.
The search settings (trials, sampler: cmaes by default, as mergekit-evolve) may sit beside them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from surgery.errors import RecipeError
from surgery.search.schema import Term, validate_model

PARAMS = {"linear": ["weight"], "task_arithmetic": ["weight"], "ties": ["weight", "density"],
          "dare_ties": ["weight", "density"]}


class Genome(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[str] = Field(min_length=1)
    merge_method: str
    base_model: str | None = None
    tokenizer_source: str | None = None
    layer_granularity: int = Field(0, ge=0)
    normalize: bool | None = None
    allow_negative_weights: bool = False
    filters: list[str] | None = None
    smooth: bool = False

    @field_validator("merge_method")
    @classmethod
    def _method(cls, v):
        if v not in PARAMS:
            raise ValueError(f"merge_method {v!r} is not one surgery searches over ({', '.join(PARAMS)}; "
                             "mergekit-evolve's slerp genome is not supported)")
        return v


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    weight: float = 1.0
    metric: str = "acc,none"


class EvolveFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    genome: Genome
    tasks: list[Union[Task, str]] = Field(min_length=1)
    limit: int | None = None
    num_fewshot: int | None = None
    shuffle: bool = False
    random_init: bool = False
    apply_chat_template: bool = True
    fewshot_as_multiturn: bool = True
    trials: int = Field(20, ge=1)
    sampler: Literal["tpe", "cmaes", "random", "grid"] = "cmaes"
    seed: int = 0
    eval: dict = Field(default_factory=dict)


def genome_settings(data: dict, where, base_dir: Path):
    """(recipe data with search variables, objective terms, where-function for the recipe, settings,
    and a function giving the loaded search's first trial: the genome's starting point, or None)."""
    cfg = validate_model(EvolveFile, data, where)
    g = cfg.genome
    if g.merge_method in ("ties", "dare_ties", "task_arithmetic") and not g.base_model:
        raise RecipeError(f"{g.merge_method} needs a base_model", where(("genome",)))
    names = input_names(g.models + ([g.base_model] if g.base_model else []))
    recipe = {"inputs": {names[m]: m for m in names}, "recipient": names[g.base_model or g.models[0]],
              "operations": [{"merge": merge_body(g, names, base_dir)}]}
    if g.tokenizer_source:
        if g.tokenizer_source not in names:
            raise RecipeError("tokenizer_source must be one of the genome's models (surgery copies one "
                              "tokenizer; mergekit's 'union' tokenizers are not supported)",
                              where(("genome", "tokenizer_source")))
        recipe["output"] = {"tokenizer_from": names[g.tokenizer_source]}
    tasks = [Task(name=t) if isinstance(t, str) else t for t in cfg.tasks]
    objective = [Term(lm_eval=t.name, metric=lm_eval_metric(t.metric), weight=t.weight) for t in tasks]
    if cfg.num_fewshot is not None:
        raise RecipeError("num_fewshot: set it in the task's YAML (surgery eval runs tasks as they are defined)",
                          where(("num_fewshot",)))
    options = {"chat": cfg.apply_chat_template, **({"limit": cfg.limit} if cfg.limit is not None else {})}
    at = where(("genome",))
    return (recipe, objective, lambda path: f"{at} ({'.'.join(map(str, path[1:]))})",
            {"trials": cfg.trials, "sampler": cfg.sampler, "seed": cfg.seed, "eval": {**options, **cfg.eval}},
            lambda spec: None if cfg.random_init else starting_point(spec, len(g.models)))


def starting_point(spec, n_models: int) -> dict:
    """mergekit-evolve's initial genotype: every weight 1/n_models, every density 1."""
    return {name: (1.0 / n_models if v.path[5] == "weight" else 1.0)
            for v in spec.variables for name in v.param_names()}


def lm_eval_metric(metric: str) -> str:
    """mergekit-evolve's 'acc,none' is surgery eval's 'acc' (the 'none' filter is left out)."""
    name, _, filt = metric.partition(",")
    return name if filt in ("", "none") else metric


def input_names(refs: list[str]) -> dict[str, str]:
    """Model reference -> a recipe input name (its last path part, made unique)."""
    out: dict[str, str] = {}
    for ref in refs:
        if ref in out:
            continue
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", ref.rstrip("/").split("/")[-1].split("@")[0]) or "model"
        name, i = stem, 2
        while name in out.values():
            name, i = f"{stem}_{i}", i + 1
        out[ref] = name
    return out


def merge_body(g: Genome, names: dict, base_dir: Path) -> dict:
    groups = g.layer_granularity
    n_groups = n_layer_groups(g, base_dir) if g.smooth and groups else 1

    def variable(param):
        low = -1.0 if param == "weight" and g.allow_negative_weights else 0.0
        var = {"float": [low, 1.0]}
        if groups and not g.smooth:
            var["layer_granularity"] = groups
        return [dict(var) for _ in range(n_groups)] if n_groups > 1 else var  # smooth: a gradient

    models = {}
    for m in g.models:
        params = {}
        for p in PARAMS[g.merge_method]:
            if g.filters:
                params[p] = [{"filter": f, "value": variable(p)} for f in g.filters] + [{"value": variable(p)}]
            else:
                params[p] = variable(p)
        models[names[m]] = params
    normalize = g.normalize if g.normalize is not None else g.merge_method in ("ties", "dare_ties", "linear")
    body = {"method": g.merge_method, "models": models, "parameters": {"normalize": normalize, "int8_mask": True},
            "dtype": "bfloat16"}
    if g.base_model:
        body["base"] = names[g.base_model]
    return body


def n_layer_groups(g: Genome, base_dir: Path) -> int:
    from surgery.io.checkpoint import Checkpoint

    config = Checkpoint.open(g.models[0], base_dir=base_dir).config
    n = int(config.get("num_hidden_layers", 0))
    if not n or n % g.layer_granularity:
        raise RecipeError(f"the models' layer count ({n}) is not a multiple of layer_granularity "
                          f"({g.layer_granularity})", "genome")
    return n // g.layer_granularity
