"""Options shared by several commands."""

from __future__ import annotations

import click

recipe_arg = click.argument("recipe", type=click.Path(dir_okay=False))
convert_opt = click.option("--convert-bin", is_flag=True,
                           help="Accept pickle .bin checkpoints, converting them once with torch.load(weights_only=True).")


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
