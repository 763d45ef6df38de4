"""What a search leaves behind: trials.csv / trials.json, best.yaml, plots, and the live table.

Rows are finished trials (complete, or failed with an error), in trial order; interrupted trials,
which were run again, are left out. Columns: trial, state (complete, pruned, fail), value (a pruned trial's:
at the fidelity it reached), each parameter, each data:metric, fidelity (the fraction of the data measured),
seconds, cached_from, hash, error.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PARAM_WIDTH = 12


@dataclass
class SearchResult:
    output: Path
    study_name: str
    storage: str
    trials: list[dict]                 # rows of trials.csv, as dicts
    best: dict | None                  # best row
    best_recipe: dict | None           # a plain recipe (best.yaml)
    evaluated: int = 0                 # trials this call evaluated (not cached, not resumed)
    files: list[str] = field(default_factory=list)
    failure: str | None = None         # one line when trials finished and none completed (surgery.search.failures)
    stopped_early: bool = False        # the trials failed with one error independent of their values

    @property
    def best_value(self) -> float | None:
        return None if self.best is None else self.best["value"]

    def to_dict(self) -> dict:
        return {"format": "surgery.search/1", "output": str(self.output), "study": self.study_name,
                "storage": self.storage, "best": self.best, "best_recipe": self.best_recipe,
                "evaluated": self.evaluated, "complete": sum(r["state"] == "complete" for r in self.trials),
                "failure": self.failure, "stopped_early": self.stopped_early, "trials": self.trials,
                "files": self.files}


def trial_rows(study, spec) -> list[dict]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) or t.user_attrs.get("interrupted"):
            continue
        row = {"trial": t.number, "state": t.state.name.lower(), "value": t.value}
        row.update({n: t.params.get(n) for n in spec.param_names()})
        for data, metrics in (t.user_attrs.get("metrics") or {}).items():
            row.update({f"{data}:{m}": v for m, v in metrics.items()})
        row.update({k: t.user_attrs.get(k) for k in ("fidelity", "seconds", "wall", "cached_from", "hash", "error")})
        rows.append(row)
    return rows


def best_row(rows: list[dict]) -> dict | None:
    complete = [r for r in rows if r["state"] == "complete"]
    return max(complete, key=lambda r: (r["value"], -r["trial"])) if complete else None


def write_results(study, spec, out: Path, storage: str):
    rows = trial_rows(study, spec)
    best = best_row(rows)
    files = ["trials.csv", "trials.json"]
    columns = list(dict.fromkeys(k for r in rows for k in r)) or ["trial", "state", "value"]
    with open(out / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    best_recipe = None
    if best is not None:
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, best["trial"])
        best_recipe = json.loads(study._storage.get_trial(trial_id).user_attrs["recipe"])
        header = (f"# best of {len(rows)} trials of {spec.source} (study {study.study_name}): "
                  f"objective {best['value']:.6g} at trial {best['trial']}\n")
        text = yaml.safe_dump(portable_recipe(best_recipe, spec.base_dir, out), sort_keys=False, allow_unicode=True)
        (out / "best.yaml").write_text(header + text)
        files.append("best.yaml")
    (out / "trials.json").write_text(json.dumps(
        {"format": "surgery.search/1", "study": study.study_name, "source": spec.source, "sampler": spec.sampler,
         "direction": "maximize", "objective": [t.model_dump(exclude_none=True) for t in spec.objective],
         "best": best, "trials": rows}, indent=2, default=str))
    files += plot_results(study, rows, out)
    return SearchResult(out.resolve(), study.study_name, storage, rows, best, best_recipe, files=files)


def portable_recipe(recipe: dict, base_dir: Path, out: Path) -> dict:
    """The recipe with local paths (inputs, adapters, neuron files) rewritten relative to ``out``,
    so best.yaml runs from where it lies; Hub ids stay as they are."""
    def fix(p):
        if isinstance(p, str) and not os.path.isabs(p) and (base_dir / p).exists():
            return os.path.relpath((base_dir / p).resolve(), out.resolve())
        return p

    recipe = json.loads(json.dumps(recipe))
    for name, spec in (recipe.get("inputs") or {}).items():
        if isinstance(spec, dict):
            spec["adapter"] = fix(spec.get("adapter"))
            spec["base"] = spec["base"] if spec.get("base") in recipe["inputs"] else fix(spec.get("base"))
        else:
            recipe["inputs"][name] = fix(spec)
    for op in recipe.get("operations") or []:
        for body in op.values() if isinstance(op, dict) else []:
            neurons = body.get("neurons") if isinstance(body, dict) else None
            if isinstance(neurons, dict) and "file" in neurons:
                neurons["file"] = fix(neurons["file"])
    return recipe


def plot_results(study, rows: list[dict], out: Path) -> list[str]:
    """objective.png (value by trial, with the running best) and importance.png (optuna.importance)."""
    complete = [r for r in rows if r["state"] == "complete"]
    if not complete:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs, ys = [r["trial"] for r in complete], [r["value"] for r in complete]
    best = [max(ys[:i + 1]) for i in range(len(ys))]
    ax.scatter(xs, ys, s=14, label="trial")
    ax.step(xs, best, where="post", color="C1", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective (maximised)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "objective.png", dpi=100)
    plt.close(fig)
    files = ["objective.png"]
    importances = param_importances(study)
    if importances:
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.4 * len(importances)))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set_xlabel("importance (fANOVA)")
        fig.tight_layout()
        fig.savefig(out / "importance.png", dpi=100)
        plt.close(fig)
        (out / "importance.json").write_text(json.dumps(importances, indent=2))
        files += ["importance.png", "importance.json"]
    return files


def param_importances(study) -> dict:
    """optuna.importance's fANOVA, when there is something to rank (>= 2 distinct values)."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len({t.value for t in complete}) < 2 or len(complete) < 3:
        return {}
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (RuntimeError, ValueError):
        return {}  # e.g. every parameter constant


class LiveTable:
    """One line per finished trial, above a progress bar."""

    def __init__(self, spec, *, total: int, done: int, quiet: bool, progress: bool = False):
        from tqdm.auto import tqdm

        self.names = spec.param_names()
        self.best = None
        self.quiet = quiet
        self.bar = tqdm(total=total, initial=done, desc="surgery search", unit="trial", disable=not progress,
                        leave=False)
        if not quiet:
            head = f"{'trial':>5}  {'value':>10}  {'best':>10}  " + "  ".join(short(n) for n in self.names)
            self.bar.write(head + "  seconds")

    def row(self, study, number: int) -> None:
        t = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
        if t.value is not None and t.state.name == "COMPLETE":
            self.best = t.value if self.best is None else max(self.best, t.value)
        self.bar.update(1)
        if self.quiet:
            return
        value = f"{t.value:>10.5g}" if t.value is not None else f"{'failed':>10}"
        params = "  ".join(f"{fmt(t.params.get(n)):>{PARAM_WIDTH}}" for n in self.names)
        note = f"cached (trial {t.user_attrs['cached_from']})" if "cached_from" in t.user_attrs else \
            f"{t.user_attrs.get('seconds', 0):.1f}"
        if t.state.name == "PRUNED":
            note += f"  pruned at fidelity {t.user_attrs.get('fidelity')}"
        line = f"{number:>5}  {value}  {self.best if self.best is not None else float('nan'):>10.5g}  {params}  {note}"
        self.bar.write(line + (f"  error: {t.user_attrs['error']}" if "error" in t.user_attrs else ""))

    def close(self) -> None:
        self.bar.close()


def short(name: str) -> str:
    """A column head: the last parts of a parameter path, right-aligned to the column width."""
    parts = name.split(".")
    head = ".".join(parts[-2:]) if len(parts) > 1 and parts[-1].startswith(("weight", "density")) else parts[-1]
    return f"{head[-PARAM_WIDTH:]:>{PARAM_WIDTH}}"


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
