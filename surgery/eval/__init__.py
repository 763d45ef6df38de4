"""Evaluate checkpoints and recipes (in memory) on local data and with lm-evaluation-harness.

    import surgery
    report = surgery.evaluate(["out/swap", "recipe.yaml"], {"sw": "texts/sw.txt"})

    from surgery.eval import load_datasets, evaluate_recipe   # per-trial use (surgery search)
    datasets = load_datasets({"sw": "texts/sw.txt"}, limit=200)
    evaluate_recipe(recipe, datasets)   # {"sw": {"perplexity": ..., "bits_per_byte": ...}}

Modules: data (files -> Dataset), metrics (built-in evaluators), harness (lm-eval backend), report (table,
JSON, CSV, plot), api (the above). Models are loaded by ``surgery.models.load_model``.
Importing this package loads neither torch nor transformers.
"""

from surgery.eval.api import evaluate, evaluate_checkpoint, evaluate_model, evaluate_recipe
from surgery.eval.data import Dataset, load_dataset, load_datasets
from surgery.eval.scores import SCHEMA, EvalReport, EvalRow

__all__ = ["evaluate", "evaluate_checkpoint", "evaluate_model", "evaluate_recipe", "Dataset", "load_dataset",
           "load_datasets", "SCHEMA", "EvalReport", "EvalRow"]
