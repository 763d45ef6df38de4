"""The search loop: an Optuna study in an RDB store, trials asked and told one by one.

    result = search("search.yaml", "runs/sw-swap")              # serial, in this process
    result = search("search.yaml", "runs/sw-swap", workers=2)   # two trials at once, on a local Ray

The study lives in ``DIR/study.db`` (SQLite) unless ``storage`` names another SQLAlchemy URL, so a
search that was killed resumes: finished trials are kept and count towards the budget; a trial that
was running when its process died is marked failed and its parameters are queued to run again.
A configuration whose resolved recipe was already measured is not evaluated again: the trial
takes the earlier value (``cached_from``). A search whose first trials all fail with one error that
does not depend on their values stops early (surgery.search.failures); when no trial completed,
``result.failure`` says so in one line (`surgery search` exits 1 with it).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.io.output import pid_alive
from surgery.search.config import Search, load_search
from surgery.search.failures import FailureWatch, failure
from surgery.search.trials import LiveTable, SearchResult, write_results
from surgery.search.space import recipe_hash

STORE_NAME = "study.db"


def search(search_file, out, *, trials: int | None = None, sampler: str | None = None, workers: int = 0,
           ray_address: str | None = None, storage: str | None = None, write_best: bool = False,
           quiet: bool = True, progress: bool = False, seed: int | None = None) -> SearchResult:
    """Run (or resume) the search described by ``search_file``; write its results under ``out``.

    ``trials``/``sampler``/``seed`` override the file's. ``workers`` > 0 or ``ray_address`` runs
    trials as Ray tasks; the default is serial, in this process, without Ray. ``quiet=False`` prints
    the live table (a line per finished trial); ``progress`` adds a progress bar.
    """
    from surgery.search.workers import make_pool

    spec = search_file if isinstance(search_file, Search) else load_search(search_file)
    if trials is not None:
        spec.trials = trials
    if sampler is not None:
        spec.sampler = sampler
    if seed is not None:
        spec.seed = seed
    if spec.sampler not in ("tpe", "cmaes", "random", "grid"):
        raise SurgeryError(f"unknown sampler {spec.sampler!r} (tpe, cmaes, random, grid)")
    if workers < 0:
        raise SurgeryError(f"--workers takes a count >= 1, got {workers}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / STORE_NAME).resolve()}"
    study = open_study(spec, storage)
    redo_interrupted(study)
    if spec.initial and not study.get_trials(deepcopy=False):
        study.enqueue_trial(spec.initial)
    target = min(spec.trials, spec.grid_size()) if spec.sampler == "grid" else spec.trials
    pool = make_pool(spec, workers=workers, ray_address=ray_address) if count_finished(study) < target else None
    watch = FailureWatch(spec)
    try:
        evaluated = run_trials(study, spec, pool, target, quiet=quiet, progress=progress, watch=watch) \
            if pool is not None else 0
    finally:
        if pool is not None:
            pool.close()
    result = write_results(study, spec, out, storage)
    result.evaluated, result.stopped_early = evaluated, watch.stop is not None
    result.failure = failure(result.trials, watch.stop)
    if write_best and result.best_recipe is not None:
        from surgery.pipeline import run
        from surgery.loader import load_recipe

        run(load_recipe(result.best_recipe, base_dir=spec.base_dir), out / "best", force=True, quiet=not progress)
        result.files.append("best/")
    return result


def open_study(spec: Search, storage: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"{Path(spec.source).stem}-{space_id(spec)}"
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=make_sampler(spec),
                                    pruner=make_pruner(spec), direction="maximize", load_if_exists=True)
    except (ImportError, ValueError) as e:
        raise SurgeryError(f"cannot open the study store {storage!r}: {e}") from None
    except Exception as e:  # sqlalchemy errors: a bad URL, an unreachable server
        if type(e).__module__.startswith("sqlalchemy"):
            raise SurgeryError(f"cannot open the study store {storage!r}: {str(e).splitlines()[0]}") from None
        raise
    done = len(study.get_trials(deepcopy=False))
    if done and spec.sampler != "grid":  # resumed: a sampler seeded as at the start would repeat its proposals
        study.sampler = make_sampler(spec, seed=spec.seed + done)
    return study


def space_id(spec: Search) -> str:
    """Identity of what a study measures: the recipe with its variables, and the objective. Changing
    either starts a new study in the same store; the budget, sampler and workers do not."""
    return recipe_hash({"recipe": spec.recipe, "objective": [t.model_dump() for t in spec.objective],
                        "eval": spec.eval})[:10]


def make_pruner(spec: Search):
    """Optuna's pruner for ``pruner:``; steps are fidelity steps, reported as 1, 2, ... (the resource)."""
    import optuna

    steps = len(spec.fidelity)
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(1, spec.trials // 4)), n_warmup_steps=0)
    if spec.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=steps, reduction_factor=2)
    return optuna.pruners.NopPruner()


def make_sampler(spec: Search, seed: int | None = None):
    import optuna

    seed = spec.seed if seed is None else seed
    if spec.sampler == "grid":
        class Grid(optuna.samplers.GridSampler):
            def after_trial(self, study, trial, state, values):
                pass  # the loop counts trials itself; GridSampler's study.stop() only works inside optimize()

            def point(self, grid_id: int) -> dict:
                return dict(zip(self._param_names, self._all_grids[grid_id]))

        # the grid's order comes from the seed and grid ids index it: a resumed grid keeps the seed
        return Grid(spec.grid_space(), seed=spec.seed)
    if spec.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise SurgeryError("the cmaes sampler needs the 'cmaes' package: pip install cmaes") from None
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def redo_interrupted(study) -> list[int]:
    """Trials left RUNNING by a process of this host that no longer exists (or by one killed before
    it could sign the trial): mark them failed (``interrupted``) and queue their parameters again.
    Trials of live processes or of other hosts (a shared store) are left alone."""
    from optuna.trial import TrialState

    redone = []
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        h, _, pid = str(t.user_attrs.get("owner", f"{host}:")).rpartition(":")
        if h != host or (pid.isdigit() and pid_alive(int(pid)) and int(pid) != os.getpid()):
            continue
        # the whole point first: a kill inside ask() can leave some of the parameters sampled, and the
        # grid sampler refuses a queued trial that fixes only some of them
        params = t.system_attrs.get("fixed_params") or grid_point(study.sampler, t) or t.params
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if params:  # killed before anything was sampled: nothing to redo, the next trial samples anew
            study.enqueue_trial(params, user_attrs={"redo_of": t.number})
        redone.append(t.number)
    return redone


def grid_point(sampler, trial) -> dict:
    """The parameters of the grid point a trial was given before it sampled them (grid sampler)."""
    grid_id = trial.system_attrs.get("grid_id")
    if grid_id is None or not hasattr(sampler, "point"):
        return {}
    return sampler.point(grid_id)


def count_finished(study) -> int:
    """Trials that count towards the budget: complete, pruned, or failed on their own (not interrupted)."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")))


def run_trials(study, spec: Search, pool, target: int, *, quiet: bool = True, progress: bool = False,
               watch: FailureWatch | None = None) -> int:
    """Ask, evaluate (fidelity step by step, asking the pruner after each) and tell until ``target`` trials are
    finished, or ``watch`` stops the search (no new trials; those running finish); return how many were evaluated."""
    from optuna.trial import TrialState

    watch = watch or FailureWatch(spec)

    distributions = spec.distributions()
    done = {t.user_attrs["hash"]: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                                                      TrialState.PRUNED))
            if "hash" in t.user_attrs}
    running: dict[str, list] = {}      # hash -> trials waiting for that evaluation
    spent: dict[str, list] = {}        # hash -> [seconds in the worker, wall] over its steps
    finished, evaluated = count_finished(study), 0
    table = LiveTable(spec, total=target, done=finished, quiet=quiet, progress=progress)
    try:
        while finished < target and (watch.stop is None or running):
            while finished + sum(map(len, running.values())) < target and pool.has_room() and watch.stop is None:
                trial = study.ask(fixed_distributions=distributions)
                recipe = spec.resolve(trial.params)
                key = recipe_hash(recipe)
                for k, v in (("owner", owner()), ("hash", key), ("recipe", json.dumps(recipe))):
                    trial.set_user_attr(k, v)
                if key in done:
                    tell_cached(study, trial, done[key])
                    finished += 1
                    table.row(study, trial.number)
                    continue
                if key not in running:
                    pool.submit(key, recipe)
                running.setdefault(key, []).append(trial)
            for key, outcome in pool.results():
                total = spent.setdefault(key, [0.0, 0.0])
                total[0] += outcome["seconds"]
                total[1] += outcome["wall"]
                trials = running[key]
                if "error" not in outcome:
                    for trial in trials:
                        trial.report(outcome["value"], outcome["step"] + 1)
                        trial.set_user_attr("metrics", outcome["metrics"])
                        trial.set_user_attr("fidelity", outcome["fidelity"])
                    if not outcome["last"] and not trials[0].should_prune():
                        pool.advance(key)  # the same worker measures the next step on the model it holds
                        continue
                    if not outcome["last"]:
                        pool.release(key)
                evaluated += 1
                trials = running.pop(key)
                if "error" in outcome:
                    watch.failed(outcome["error"], trials[0].params)
                else:
                    watch.completed()  # measured (to the end, or pruned): the recipe evaluates
                for trial in trials:
                    trial.set_user_attr("seconds", round(total[0], 3))  # in the worker
                    trial.set_user_attr("wall", round(total[1], 3))     # submit to result, here
                    if "error" in outcome:
                        trial.set_user_attr("error", outcome["error"])
                        study.tell(trial, state=TrialState.FAIL)
                    else:
                        study.tell(trial, outcome["value"] if outcome["last"] else None,
                                   state=TrialState.COMPLETE if outcome["last"] else TrialState.PRUNED)
                        done.setdefault(key, study._storage.get_trial(trial._trial_id))
                    finished += 1
                    table.row(study, trial.number)
                spent.pop(key)
    finally:
        table.close()
    return evaluated


def tell_cached(study, trial, earlier) -> None:
    """Finish ``trial`` as the earlier trial of the same recipe finished: its value, or pruned at its fidelity."""
    from optuna.trial import TrialState

    trial.set_user_attr("cached_from", earlier.number)
    for k in ("metrics", "fidelity"):
        if k in earlier.user_attrs:
            trial.set_user_attr(k, earlier.user_attrs[k])
    if earlier.state == TrialState.PRUNED:
        for step, value in sorted(earlier.intermediate_values.items()):
            trial.report(value, step)
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, earlier.value)
