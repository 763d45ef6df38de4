"""The objective of a trial: a weighted sum of metrics, measured on the recipe's model, kept in memory.

    evaluate = TrialEvaluator([{"data": "texts/sw.txt", "metric": "bits_per_byte", "weight": -1}],
                              options={"limit": 200}, base_dir=".", fidelity=[0.25, 1])
    evaluate(recipe_dict)       # {"value": -1.31, "metrics": {...}, "step": 0, "fidelity": 0.25, "last": False, ...}
    evaluate(None, step=1)      # the same trial on all the data: {"value": -1.23, ..., "last": True}

Data sets are loaded once per evaluator (one per worker) and reused by every trial; the worker's one model is
patched to each recipe (``surgery.search.resident``) without writing anything. A user error in a trial (a
configuration that cannot be planned) fails that trial, not the search.
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
    """Evaluates resolved recipes (dicts) on data sets loaded once, in one model kept between trials.

    ``evaluate(recipe)`` patches the worker's model to the recipe (``ResidentModel``: only the tensors whose op
    tree differs from what the model holds are computed) and measures the first fidelity step;
    ``evaluate(recipe, step=k)`` goes on with the same model, adding the items of step k (``fidelity``)."""

    def __init__(self, objective: list[dict], options: dict, base_dir: str, datasets: dict | None = None,
                 fidelity: list[float] | tuple = (1.0,)):
        from surgery.search.fidelity import fidelity_steps
        from surgery.search.resident import ResidentModel

        self.terms = [Term(**t) for t in objective]
        self.options = dict(options)
        self.base_dir = Path(base_dir)
        for key in ("tokenizer", "include_path"):
            if key in self.options:
                self.options[key] = str(self.base_dir / self.options[key])
        self.datasets = datasets if datasets is not None else \
            load_objective_data(self.terms, self.base_dir, self.options)
        self.fidelity = list(fidelity)
        self.steps = fidelity_steps(list(self.datasets.values()), self.fidelity, self.options.get("seed", 0))
        self.resident = ResidentModel(device=self.options.get("device", "auto"), dtype=self.options.get("dtype"),
                                      tokenizer=self.options.get("tokenizer"))
        self.loaded = self.totals = None

    def __call__(self, recipe: dict, step: int = 0) -> dict:
        from surgery.search.fidelity import Totals

        start = time.perf_counter()
        try:
            if step == 0:
                self.loaded, self.totals = None, Totals()
                self.loaded = self.model_for(recipe)
            metrics = self.measure_step(step)
        except SurgeryError as e:
            self.loaded = None
            return {"error": str(e), "seconds": time.perf_counter() - start}
        try:
            value = sum(t.weight * metrics[t.data or t.lm_eval][t.metric] for t in self.terms)
        except KeyError as e:
            name = next(t for t in self.terms if (t.data or t.lm_eval) not in metrics
                        or t.metric not in metrics[t.data or t.lm_eval])
            raise SurgeryError(f"objective: {name.data or name.lm_eval} has no metric {name.metric!r} "
                               f"(measured: {', '.join(metrics.get(name.data or name.lm_eval, {}))})") from e
        return {"value": float(value), "metrics": metrics, "seconds": time.perf_counter() - start, "step": step,
                "fidelity": self.fidelity[step], "last": step == len(self.fidelity) - 1,
                "patched": self.resident.patched if step == 0 else 0}

    def model_for(self, recipe: dict):
        """(model, tokenizer) of the recipe's output: the resident model, patched."""
        from surgery.loader import load_recipe
        from surgery.pipeline import build_plan

        if self.resident.device == "auto":
            from surgery.core.devices import resolve_device

            self.resident.device = resolve_device("auto")
        return self.resident.load(build_plan(load_recipe(recipe, base_dir=self.base_dir)))

    def measure_step(self, step: int) -> dict:
        """{data or task: {metric: value}} on the items of steps 0..step (lm-eval tasks: in one step, whole)."""
        from surgery.search.fidelity import measure_part

        if self.loaded is None:
            raise SurgeryError(f"fidelity step {step}: no trial is loaded in this worker")
        model, tokenizer = self.loaded
        self.totals.add(measure_part(model, tokenizer, self.steps[step], self.options))
        metrics = self.totals.metrics()
        tasks = list(dict.fromkeys(t.lm_eval for t in self.terms if t.lm_eval))
        if tasks:
            from surgery.eval.harness import run_lm_eval

            o = self.options
            metrics.update(run_lm_eval(model, tokenizer, tasks, include_path=o.get("include_path"),
                                       limit=o.get("limit"), batch_size=o.get("batch_size", 8), seed=o.get("seed", 0),
                                       chat=o.get("chat", False), max_length=o.get("max_length")))
        return metrics


def check_eval_options(options: dict, where) -> None:
    for key in options:
        if key not in EVAL_OPTIONS:
            import difflib

            hint = difflib.get_close_matches(str(key), EVAL_OPTIONS, n=1, cutoff=0.5)
            raise RecipeError(f"unknown eval option {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                              + f" (valid: {', '.join(EVAL_OPTIONS)})", where(("eval", key)))
