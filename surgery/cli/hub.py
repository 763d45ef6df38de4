"""`surgery push`: publish a `surgery run` output on the Hugging Face Hub."""

from __future__ import annotations

import json

import click

from surgery.cli.options import push_options

EPILOG = """\b
Examples:
  surgery push out/swapped me/math-swahili-swap               # private repo, one commit on main
  surgery push out/swapped me/math-swahili-swap --dry-run     # list files and sizes only
  surgery push out/swapped me/math-swahili-swap --public --revision v2
  surgery push out/swapped org/model --create-pr              # open a pull request instead
  HF_ENDPOINT=https://hub.example.com surgery push out/swapped me/model --json

\b
The token comes from --token, else HF_TOKEN, else `hf auth login`; it is never printed.
"""


@click.command(epilog=EPILOG)
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.argument("repo_id")
@push_options
@click.option("--dry-run", is_flag=True, help="List what would be uploaded, with sizes; upload nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def push(out_dir, repo_id, public, revision, create_pr, token, dry_run, as_json):
    """Upload OUT_DIR (a `surgery run` output) to the Hub model repo REPO_ID in one commit.

    The repo is created if missing, private unless --public. Everything in OUT_DIR goes up,
    safetensors through LFS, with the model card (README.md) `surgery run` wrote.
    """
    from surgery.io.hub import push as push_folder

    result = push_folder(out_dir, repo_id, token=token, private=not public, revision=revision,
                         create_pr=create_pr, dry_run=dry_run)
    echo_push(result, as_json)


def echo_push(result, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    from surgery.io.output import format_size

    where = f"{result.repo_id} ({'private' if result.private else 'public'}, " \
            f"{'pull request against ' if result.pull_request else 'branch '}{result.revision}) at {result.endpoint}"
    if result.dry_run:
        click.echo(f"dry run: would push {len(result.files)} files ({format_size(result.total_bytes)}) to {where}")
        width = max((len(p) for p, _ in result.files), default=0)
        for path, size in result.files:
            click.echo(f"  {path:<{width}}  {format_size(size):>9}")
        click.echo(f"commit message: {result.commit_message}")
        return
    click.echo(f"pushed {len(result.files)} files ({format_size(result.total_bytes)}) to {where}")
    if result.pr_url:
        click.echo(f"  pull request: {result.pr_url}")
    if result.commit_url:
        click.echo(f"  commit: {result.commit_url}")
