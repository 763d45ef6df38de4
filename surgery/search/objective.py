"""The objective of a trial: a weighted sum of metrics, measured on the recipe's in-memory model.

    evaluate = TrialEvaluator([{"data": "texts/sw.txt", "metric": "bits_per_byte", "weight": -1}],
                              options={"limit": 200}, base_dir=".")
    evaluate(recipe_dict)    # {"value": -1.23, "metrics": {"texts/sw.txt": {...}}, "seconds": 0.8}

Data sets are loaded once per evaluator (one per worker) and reused by every trial; each recipe is
planned and streamed into a model by ``surgery.eval`` without writing anything. A user error in a
trial (a configuration that cannot be planned) fails that trial, not the search.
"""

from __future__ import annotations

import time
from pathlib import Path

from surgery.errors import RecipeError, SurgeryError
from surgery.search.schema import Term

# `eval:` options of a search file: those of surgery.eval.evaluate_recipe (limit and seed also pick the data)
EVAL_OPTIONS = ("limit", "seed", "device", "dtype", "batch_size", "chat", "max_length", "max_new_tokens",
                "tokenizer", "include_path")
# metric -> the data-set kind (surgery.eval.data) that has it
METRIC_KINDS = {"perplexity": "text", "bits_per_byte": "text", "exact_match": "generation",
                "numeric_match": "generation", "acc": "choice", "acc_norm": "choice"}


def load_objective_data(objective, base_dir: Path, options: dict, where=None):
    """The local data sets of the objective terms, loaded and checked against their metrics."""
    from surgery.eval.data import load_dataset

    datasets = {}
    for i, term in enumerate(objective):
        if term.data is None:
            continue
        at = where(("objective", i)) if where else f"objective.{i}"
        path = Path(term.data) if Path(term.data).is_absolute() else Path(base_dir) / term.data
        if term.data not in datasets:
            try:
                datasets[term.data] = load_dataset(term.data, path, limit=options.get("limit"),
                                                   seed=options.get("seed", 0))
            except SurgeryError as e:
                raise RecipeError(str(e), at) from None
        kind = datasets[term.data].kind
        if METRIC_KINDS[term.metric] != kind:
            raise RecipeError(f"metric {term.metric} needs {METRIC_KINDS[term.metric]} data; {term.data} holds "
                              f"{kind} data (its metrics: "
                              f"{', '.join(m for m, k in METRIC_KINDS.items() if k == kind)})", at)
    return datasets


class TrialEvaluator:
    """Evaluates resolved recipes (dicts) in memory on data sets loaded once."""

    def __init__(self, objective: list[dict], options: dict, base_dir: str, datasets: dict | None = None):
        self.terms = [Term(**t) for t in objective]
        self.options = dict(options)
        self.base_dir = Path(base_dir)
        self.datasets = datasets if datasets is not None else \
            load_objective_data(self.terms, self.base_dir, self.options)

    def __call__(self, recipe: dict) -> dict:
        from surgery.loader import load_recipe

        start = time.perf_counter()
        try:
            metrics = self.measure(load_recipe(recipe, base_dir=self.base_dir))
        except SurgeryError as e:
            return {"error": str(e), "seconds": time.perf_counter() - start}
        try:
            value = sum(t.weight * metrics[t.data or t.lm_eval][t.metric] for t in self.terms)
        except KeyError as e:
            name = next(t for t in self.terms if (t.data or t.lm_eval) not in metrics
                        or t.metric not in metrics[t.data or t.lm_eval])
            raise SurgeryError(f"objective: {name.data or name.lm_eval} has no metric {name.metric!r} "
                               f"(measured: {', '.join(metrics.get(name.data or name.lm_eval, {}))})") from e
        return {"value": float(value), "metrics": metrics, "seconds": time.perf_counter() - start}

    def measure(self, recipe) -> dict:
        """{data or task: {metric: value}} for the recipe's model, built in memory."""
        from surgery.eval import evaluate_recipe

        tasks = list(dict.fromkeys(t.lm_eval for t in self.terms if t.lm_eval))
        options = dict(self.options)
        for key in ("tokenizer", "include_path"):
            if key in options:
                options[key] = str(self.base_dir / options[key])
        return evaluate_recipe(recipe, list(self.datasets.values()), lm_eval=tasks or None, quiet=True, **options)


def check_eval_options(options: dict, where) -> None:
    for key in options:
        if key not in EVAL_OPTIONS:
            import difflib

            hint = difflib.get_close_matches(str(key), EVAL_OPTIONS, n=1, cutoff=0.5)
            raise RecipeError(f"unknown eval option {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                              + f" (valid: {', '.join(EVAL_OPTIONS)})", where(("eval", key)))
