"""lm-evaluation-harness as the standard backend, on a model already in memory.

    scores = run_lm_eval(model, tokenizer, ["arc_easy"], include_path="tasks/", limit=200)
    # {"arc_easy": {"acc": 0.61, "acc_norm": 0.57}}

lm-eval's HF wrapper (``HFLM``) takes the model object, so a recipe evaluated in memory is never
written. ``include_path`` adds local task YAMLs; tasks whose data are local JSON files run offline.
Needs the optional extra: ``pip install 'surgery[eval]'``.
"""

from __future__ import annotations

from surgery.errors import SurgeryError


def task_manager(tasks: list[str], include_path=None):
    """Index only the local tasks when they cover ``tasks`` (fast), else lm-eval's own as well."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = (f" (looked in lm-eval's tasks and {include_path})" if include_path
                 else " (give local task YAMLs with --include-path)")
        raise SurgeryError(f"--lm-eval: unknown task {unknown[0]!r}{where}")
    return manager


def run_lm_eval(model, tokenizer, tasks: str | list[str], *, include_path=None, limit: int | float | None = None,
                batch_size: int = 8, seed: int = 0, chat: bool = False, max_length: int | None = None,
                quiet: bool = True) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on ``model``; return {task: {metric: value}} (stderrs left out;
    a metric with a filter other than 'none' is named 'metric,filter')."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise SurgeryError("--lm-eval needs lm-evaluation-harness: pip install 'surgery[eval]'") from None
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if include_path is not None:
        from pathlib import Path

        for p in [include_path] if isinstance(include_path, (str, Path)) else include_path:
            if not Path(p).is_dir():
                raise SurgeryError(f"--include-path {p}: not a directory")
    if quiet:
        import logging

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = task_manager(tasks, include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              device=str(model.device))
    try:
        out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                              apply_chat_template=chat, log_samples=False, bootstrap_iters=0)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SurgeryError(f"--lm-eval {','.join(tasks)}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    return flatten(out["results"])


def flatten(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's {'task': {'acc,none': .., 'acc_stderr,none': .., 'alias': ..}} -> {'task': {'acc': ..}}."""
    flat = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")
            if (not comma or metric.endswith("_stderr") or not isinstance(value, (int, float))
                    or isinstance(value, bool)):
                continue
            row[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
        flat[task] = row
    return flat
