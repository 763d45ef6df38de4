"""`surgery eval` as Python: checkpoints and recipes, on local data and lm-eval tasks.

    import surgery
    report = surgery.evaluate(["out/swap", "recipes/layer_swap.yaml"], {"sw": "texts/sw.txt"})
    print(report.format()); report.to_dict(); report.plot("eval.png")

For many evaluations of recipes (a search), load the data once and evaluate each recipe in memory:

    from surgery.eval import load_datasets, evaluate_recipe
    datasets = load_datasets({"sw": "texts/sw.txt", "mgsm": "tasks/mgsm_sw.jsonl"}, limit=200)
    scores = evaluate_recipe(recipe, datasets)   # {"sw": {"perplexity": ..., "bits_per_byte": ...}, ...}
"""

from __future__ import annotations

import gc
import time
import weakref
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.eval.data import Dataset, load_datasets
from surgery.eval.scores import EvalReport, EvalRow


def evaluate_model(model, tokenizer, datasets: list[Dataset], *, lm_eval=None, include_path=None,
                   limit: int | float | None = None, seed: int = 0, batch_size: int = 8, chat: bool = False,
                   max_length: int | None = None, max_new_tokens: int = 64,
                   quiet: bool = True) -> dict[str, dict[str, float]]:
    """Evaluate a loaded model on data sets (from ``load_datasets``) and lm-eval tasks.

    Returns {data or task name: {metric: value}}: perplexity and bits_per_byte for text,
    exact_match and numeric_match for generation, acc and acc_norm for multiple choice, and
    lm-eval's metrics (without stderrs) for each task. ``datasets`` may also be what
    ``load_datasets`` takes ({name: path}, 'NAME=PATH' strings): then they are loaded here, every call."""
    from tqdm.auto import tqdm

    from surgery.eval import metrics

    datasets = as_datasets(datasets)
    scores = {}
    for ds in datasets:
        with tqdm(total=len(ds), desc=f"eval {ds.name}", disable=quiet, leave=False) as bar:
            if ds.kind == "text":
                scores[ds.name] = metrics.perplexity(model, tokenizer, ds.items, batch_size=batch_size,
                                                     max_length=max_length, bar=bar)
            elif ds.kind == "generation":
                scores[ds.name] = metrics.generation(model, tokenizer, ds.items, max_new_tokens=max_new_tokens,
                                                     batch_size=batch_size, chat=chat, bar=bar)
            else:
                scores[ds.name] = metrics.multiple_choice(model, tokenizer, ds.items, batch_size=batch_size,
                                                          max_length=max_length, bar=bar)
    if lm_eval:
        from surgery.eval.harness import run_lm_eval

        scores.update(run_lm_eval(model, tokenizer, lm_eval, include_path=include_path, limit=limit,
                                  batch_size=batch_size, seed=seed, chat=chat, max_length=max_length, quiet=quiet))
    return scores


def as_datasets(data) -> list[Dataset]:
    if data is None:
        return []
    if isinstance(data, (list, tuple)) and all(isinstance(d, Dataset) for d in data):
        return list(data)
    return load_datasets(data)


def evaluate_recipe(recipe, datasets: list[Dataset], *, device: str = "auto", dtype: str | None = None,
                    tokenizer: str | Path | None = None, plan=None, **options) -> dict[str, dict[str, float]]:
    """Build a recipe's output in memory (bitwise what `surgery run` writes; nothing touches disk),
    evaluate it on ``datasets`` (from ``load_datasets``, loaded once and reused), free it, and return
    {data name: {metric: value}}. ``recipe``: a ``Recipe``, a path or a dict; ``plan``: an already
    built plan of it; ``options``: those of ``evaluate_model`` (lm_eval, batch_size, chat, ...)."""
    return evaluate_target(recipe if plan is None else plan, datasets, device=device, dtype=dtype,
                           tokenizer=tokenizer, **options)


def evaluate_checkpoint(path, datasets: list[Dataset], *, device: str = "auto", dtype: str | None = None,
                        tokenizer: str | Path | None = None, **options) -> dict[str, dict[str, float]]:
    """Load a checkpoint (a folder, a .safetensors file, a Hub id) and evaluate it like ``evaluate_recipe``."""
    return evaluate_target(path, datasets, device=device, dtype=dtype, tokenizer=tokenizer, **options)


def evaluate_target(target, datasets: list[Dataset], *, device: str = "auto", dtype: str | None = None,
                    tokenizer: str | Path | None = None, **options) -> dict[str, dict[str, float]]:
    """Load anything ``surgery.models.load_model`` loads (a checkpoint, a Hub id, a recipe in memory), evaluate
    it on ``datasets``, free it, and return {data name: {metric: value}}."""
    from surgery.core.devices import resolve_device
    from surgery import models

    loaded = list(models.load_model(target, device=resolve_device(device), dtype=dtype, tokenizer=tokenizer,
                                    progress=not options.get("quiet", True)))
    return _evaluate_then_free(loaded, datasets, options)


def _evaluate_then_free(loaded: list, datasets, options: dict) -> dict[str, dict[str, float]]:
    """``evaluate_model`` of ``loaded`` = [model, tokenizer], the only reference to the model, which is then freed:
    by reference count where nothing cycles back to it (the models built in memory), else by a full
    collection (transformers' ``from_pretrained`` leaves reference cycles). A full collection walks every object
    torch and transformers created, ~0.7 s: a search paid it for every trial while it was unconditional."""
    model = weakref.ref(loaded[0])
    try:
        return evaluate_model(*loaded, datasets, **options)
    finally:
        loaded.clear()
        if model() is not None:
            gc.collect()


def evaluate(targets, data=None, *, lm_eval=None, include_path=None, limit: int | None = None, seed: int = 0,
             device: str = "auto", dtype: str | None = None, batch_size: int = 8, chat: bool = False,
             max_length: int | None = None, max_new_tokens: int = 64, tokenizer: str | Path | None = None,
             quiet: bool = True) -> EvalReport:
    """Evaluate checkpoints and recipes (evaluated in memory, nothing written) on local data sets
    and lm-eval tasks; return an ``EvalReport`` with a row per target.

    ``targets``: one or a list of checkpoints (folders, .safetensors files, Hub ids), recipe paths, recipe dicts
    or ``Recipe`` objects.
    ``data``: {name: path}, 'NAME=PATH' strings or ``Dataset`` objects (.txt, .jsonl; docs/eval.md).
    ``lm_eval``: task names (a list or 'a,b'); ``include_path``: a folder of local task YAMLs.
    ``limit``: items per data set (a random subset drawn with ``seed``) and per lm-eval task.
    ``tokenizer``: a folder whose tokenizer replaces the targets' own."""
    from surgery.core.devices import resolve_device
    from surgery.models import model_kind, torch_dtype_of

    if isinstance(targets, (str, Path, dict)) or not isinstance(targets, (list, tuple)):
        targets = [targets]
    if not targets:
        raise SurgeryError("nothing to evaluate: give a checkpoint directory or a recipe")
    if data is None and not lm_eval:
        raise SurgeryError("nothing to evaluate on: give --data NAME=PATH or --lm-eval TASKS")
    if batch_size < 1 or (limit is not None and limit < 1) or (max_length is not None and max_length < 2):
        raise SurgeryError("--batch-size and --limit must be at least 1, --max-length at least 2")
    kinds = [model_kind(t) for t in targets]  # every reference checked before any work
    datasets = load_datasets(data, limit=limit, seed=seed) if data is not None else []
    device = resolve_device(device)
    torch_dtype_of(dtype)  # validate before any work
    options = dict(lm_eval=lm_eval, include_path=include_path, limit=limit, seed=seed, batch_size=batch_size,
                   chat=chat, max_length=max_length, max_new_tokens=max_new_tokens, quiet=quiet)
    rows = []
    import torch

    for target, kind in zip(targets, kinds):
        torch.manual_seed(seed)
        start = time.perf_counter()
        scores = evaluate_target(target, datasets, device=device, dtype=dtype, tokenizer=tokenizer, **options)
        rows.append(EvalRow(_label(target), kind, scores, time.perf_counter() - start))
    settings = {"limit": limit, "seed": seed, "device": device, "dtype": dtype, "batch_size": batch_size,
                "chat": chat, "max_length": max_length, "max_new_tokens": max_new_tokens,
                "lm_eval": lm_eval, "include_path": str(include_path) if include_path else None}
    described = [{"name": d.name, "kind": d.kind, "path": str(d.path) if d.path else None, "items": len(d)}
                 for d in datasets]
    return EvalReport(rows, described, settings)


def _label(target) -> str:
    from surgery.recipe.schema import Recipe

    if isinstance(target, Recipe):
        return target.source or "recipe"
    return "recipe" if isinstance(target, dict) else str(target)
