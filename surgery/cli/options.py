"""Options shared by several commands."""

from __future__ import annotations

import click

recipe_arg = click.argument("recipe", type=click.Path(dir_okay=False))
convert_opt = click.option("--convert-bin", is_flag=True,
                           help="Accept pickle .bin checkpoints, converting them once with torch.load(weights_only=True).")

mergekit_lenient_opt = click.option(
    "--mergekit-lenient", is_flag=True,
    help="Run a mergekit config as mergekit does: keys and parameters it ignores (misplaced, unknown to the "
         "method, misspelt) are ignored with a warning instead of refused.")


def _set_threads(ctx, param, value):
    from surgery.core.threads import set_threads

    return set_threads(value)


threads_opt = click.option(
    "--threads", type=click.IntRange(min=1), default=None, callback=_set_threads, expose_value=False,
    help="Torch threads for the computation. Default: SURGERY_THREADS, else OMP_NUM_THREADS, else the idle "
         "cores (usable cores minus the 1-minute load average, at least 1). Results do not depend on it.")


def _request_threads(ctx, param, value):
    from surgery.core.devices import request_threads

    request_threads(value)  # applied when `run` computes its first tensor: a copy-only run never imports torch


def _requested_threads_opt(help: str):
    return click.option("--threads", type=click.IntRange(min=1), default=None, callback=_request_threads,
                        expose_value=False, help=help)


run_threads_opt = _requested_threads_opt(
    "Torch threads for the computation. Default: SURGERY_THREADS, else OMP_NUM_THREADS, else 1 (streamed "
    "elementwise math gains nothing from more; TIES uses a thread per model). Results do not depend on it.")
plan_threads_opt = _requested_threads_opt(
    "Accepted as `run` accepts it. Planning computes no tensor, so it does not import torch for threads.")


def push_options(fn):
    """--public/--revision/--create-pr/--token, shared by `surgery push` and `surgery run --push-to`."""
    for option in reversed([
        click.option("--public", is_flag=True, help="Create the repo public (default: private). "
                                                    "An existing repo keeps its visibility."),
        click.option("--revision", metavar="BRANCH", help="Commit to this branch, created from main if missing."),
        click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it."),
        click.option("--token", metavar="TOKEN", help="Hub token with write access (default: HF_TOKEN, then "
                                                      "`hf auth login`)."),
    ]):
        fn = option(fn)
    return fn


def show_progress(*silenced: bool) -> bool:
    """Progress bars are for a person at a terminal: not with --quiet/--json, not into logs or pipes. The
    decision also holds for the libraries' bars beneath the command (``surgery.io.progress``)."""
    from surgery.io.progress import decide

    return decide(*silenced)
