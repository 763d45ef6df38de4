"""`surgery mergekit CONFIG OUT`: mergekit's own pipeline with surgery's merge methods registered."""

from __future__ import annotations

import click

from surgery.cli.options import show_progress


EPILOG = """\b
Example config (layer swap: the recipient is base_model, the donor the other model):
  merge_method: surgery_layer_swap
  base_model: ./math-expert
  models:
    - model: ./swahili-expert
  parameters:
    bottom: 4            # layers 0-3 from the donor
    top: 4               # and the last 4
    transition: 2        # ramped blends next to each swapped block
    embeddings: recipient
  dtype: bfloat16
\b
AdaMergeX-style arithmetic (weights may be negative; no base needed):
  merge_method: surgery_arithmetic
  models:
    - model: ./math-expert
      parameters: {weight: 1.0}
    - model: ./swahili-lang
      parameters: {weight: 1.0}
    - model: ./english-lang
      parameters: {weight: -1.0}
\b
Methods: surgery_layer_swap, surgery_arithmetic, surgery_blend, surgery_transplant
(MLP neurons: parameters {neurons: "4: 3,17,40"}), plus every built-in
mergekit method. Any other option is passed to mergekit unchanged (the options of
mergekit-yaml, e.g. --random-seed 1, --no-copy-tokenizer, --allow-crimes, --cuda,
--out-shard-size 1B, -v); see them with --mergekit-help.
\b
Examples:
  surgery mergekit swap.yml out/swapped
  surgery mergekit merge.yml out/merged --force --random-seed 0 --no-copy-tokenizer
"""


@click.command(epilog=EPILOG, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("config", type=click.Path(dir_okay=False), required=False)
@click.argument("out", type=click.Path(file_okay=False), required=False)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--mergekit-help", is_flag=True, help="Show the mergekit-yaml options that pass through, and exit.")
@click.pass_context
def mergekit(ctx, config, out, force, mergekit_help):
    """Run the mergekit config CONFIG with mergekit, writing OUT; surgery's methods are registered.

    This is `mergekit-yaml CONFIG OUT` in-process, plus the surgery_* merge methods and an
    atomic output (written beside OUT, renamed when complete).
    """
    if mergekit_help:
        from mergekit.scripts.run_yaml import main as mergekit_yaml

        with mergekit_yaml.make_context("surgery mergekit", ["-", "-"]) as mctx:
            click.echo(mergekit_yaml.get_help(mctx))
        return
    if not config or not out:
        raise click.UsageError("CONFIG and OUT are required")
    from surgery.errors import SurgeryError
    from surgery.mergekit.runner import options_from_args, run_mergekit

    try:
        options = options_from_args(list(ctx.args))
    except SurgeryError as e:
        raise click.UsageError(str(e)) from None
    # mergekit's --quiet only hides its bars: the one rule decides them
    bars = options.model_copy(update={"quiet": not show_progress(options.quiet)})
    target = run_mergekit(config, out, options=bars, force=force)
    if not options.quiet:
        click.echo(f"wrote {target}")
