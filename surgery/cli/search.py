"""`surgery search`: search over recipe values with Optuna, trials evaluated in memory."""

from __future__ import annotations

import json

import click

from surgery.cli.options import show_progress, threads_opt

EPILOG = """\b
Examples:
  surgery search search.yaml -o runs/sw-swap                  # serial, resumable (runs/sw-swap/study.db)
  surgery search search.yaml -o runs/sw-swap                  # again: resumes, keeps finished trials
  surgery search search.yaml -o runs/grid --sampler grid --trials 200
  surgery search search.yaml -o runs/x --workers 4            # 4 trials at once on a local Ray
  surgery search search.yaml -o runs/x --ray-address auto --storage postgresql://host/db
  surgery search evolve.yml -o runs/evo --write-best          # a mergekit-evolve config

\b
search.yaml holds a recipe whose values may be search variables, and an objective:
  recipe:
    inputs: {math: ckpt/math, sw: ckpt/sw}
    recipient: math
    operations:
      - layer_swap: {donor: sw, bottom: {int: [0, 8]}, top: {int: [0, 4]}, transition: {choice: [0, 1]}}
  objective:
    - {data: texts/sw.txt, metric: bits_per_byte, weight: -1}
  trials: 30
  sampler: tpe            # tpe | cmaes | random | grid
See docs/search.md.
"""


@click.command(epilog=EPILOG)
@click.argument("search_file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False),
              help="Output directory: study.db, trials.csv/json, best.yaml, plots.")
@click.option("--trials", type=click.IntRange(min=1), help="Trials in the study (overrides the file).")
@click.option("--sampler", type=click.Choice(["tpe", "cmaes", "random", "grid"]), help="Overrides the file.")
@click.option("--seed", type=int, help="Sampler seed (overrides the file).")
@click.option("--workers", type=click.IntRange(min=1), help="Trials at once, as Ray actors on a local Ray "
                                                            "(default: one at a time, in this process).")
@click.option("--ray-address", metavar="ADDR", help="Join this Ray cluster ('auto' or host:port) instead.")
@click.option("--storage", metavar="URL", help="Optuna storage (any SQLAlchemy URL); default sqlite in OUTPUT.")
@click.option("--write-best", is_flag=True, help="Also write the best configuration's checkpoint to OUTPUT/best.")
@click.option("-q", "--quiet", is_flag=True, help="No live table or progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@threads_opt
def search(search_file, out, trials, sampler, seed, workers, ray_address, storage, write_best, quiet, as_json):
    """Search the values of SEARCH_FILE's recipe for the best objective; resumable.

    Each trial fills in the search variables, plans the recipe and evaluates it in memory
    (nothing is written); identical configurations are evaluated once.
    """
    from surgery.errors import SurgeryError
    from surgery.search.study import search as run_search

    result = run_search(search_file, out, trials=trials, sampler=sampler, seed=seed, workers=workers or 0,
                        ray_address=ray_address, storage=storage, write_best=write_best,
                        quiet=quiet or as_json, progress=show_progress(quiet, as_json))
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    if result.failure:  # no trial completed: exit 1 with the count and the most common error
        raise SurgeryError(f"{result.failure} (every trial: {result.output / 'trials.csv'})")
    if quiet or as_json:
        return
    done = sum(r["state"] == "complete" for r in result.trials)
    click.echo(f"{len(result.trials)} trials ({done} complete, {result.evaluated} evaluated now) in study "
               f"{result.study_name}")
    if result.best is not None:
        params = ", ".join(f"{k}={v}" for k, v in result.best.items() if k in _param_keys(result))
        click.echo(f"best: trial {result.best['trial']}, objective {result.best['value']:.6g} ({params})")
    click.echo(f"wrote {', '.join(result.files)} to {result.output}")


def _param_keys(result) -> set:
    fixed = {"trial", "state", "value", "seconds", "wall", "cached_from", "hash", "error"}
    return {k for k in result.best if k not in fixed and ":" not in k}
