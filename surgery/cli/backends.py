"""`surgery backends`: the merge backend table (``surgery.merge.table``)."""

from __future__ import annotations

import json

import click


@click.command(epilog="\b\nExamples:\n  surgery backends\n  surgery backends --json\n"
                      "  surgery run ties.yml -o out/ --backend mergekit   # the same bytes through mergekit's kernels")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def backends(as_json):
    """List each merge method's backends: dtypes, devices, exactness, what they need and when they apply.

    `surgery run` picks the first row of a method that applies (top to bottom); `--backend` (or
    $SURGERY_BACKEND) skips the compiled kernels (numpy), all host math (torch), or everything but mergekit's
    own kernels (mergekit). Methods not listed run on mergekit's own kernels.
    """
    from surgery.merge.table import describe

    rows = describe()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    cols = ("method", "backend", "dtypes", "devices", "exact", "when", "needs", "available")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    click.echo("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        click.echo("  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip())
