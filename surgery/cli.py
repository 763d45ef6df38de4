"""The `surgery` command line: a thin shell over the Python API.

Only click is imported at start-up; torch, transformers and mergekit load inside commands.
"""

from __future__ import annotations

import json
import warnings

import click

from .errors import SurgeryError

EPILOG = """\b
Examples:
  surgery demo                                   # tiny demo checkpoints + a layer swap
  surgery validate recipes/layer_swap.yaml
  surgery plan recipes/layer_swap.yaml           # where every tensor comes from
  surgery run recipes/layer_swap.yaml -o out/swapped
  surgery schema > recipe.schema.json            # for editor autocompletion
  surgery diff demo/checkpoints/base sw=demo/checkpoints/swahili --plot diff.png
  surgery run mergekit-config.yml -o out/merged  # mergekit configs run unchanged
  surgery push out/swapped me/math-sw            # upload with a model card
  surgery eval out/swapped recipe.yaml --data sw=texts/sw.txt   # measure (recipes in memory)
"""


class SurgeryGroup(click.Group):
    """Turns user errors into one line on stderr and exit code 1 (tracebacks with --debug)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SurgeryError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            ctx.exit(130)


def _warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {message}", err=True)


@click.group(cls=SurgeryGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="surgery")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def cli(ctx, debug):
    """Model surgery on LLM checkpoints: layer swaps, arithmetic, merges, at the safetensors level.

    Recipes are YAML files; `surgery schema` prints their JSON Schema and recipes/ has
    commented examples.
    """
    ctx.ensure_object(dict)["debug"] = debug
    if not debug:
        warnings.showwarning = _warning


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


@cli.command(epilog="\b\nExamples:\n  surgery run recipes/layer_swap.yaml -o out/swapped\n"
                    "  surgery run recipe.yaml -o out/ --force --quiet --json\n"
                    "  surgery run recipe.yaml -o out/merged --push-to me/merged-model\n"
                    "  surgery run mergekit-config.yml -o out/ --random-seed 42")
@recipe_arg
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--random-seed", type=int, default=None,
              help="Seed for random merge methods (DARE, DELLA); overrides the recipe's 'seed'.")
@click.option("--fast-kernels", is_flag=True,
              help="TIES by selection instead of sorting: faster; entries exactly at the density threshold may differ from mergekit.")
@convert_opt
@click.option("--push-to", metavar="REPO_ID", help="After a successful run, push the output to this Hub repo "
                                                   "(see `surgery push --help`).")
@push_options
def run(recipe, out, force, quiet, as_json, convert_bin, random_seed, fast_kernels, push_to, public, revision,
        create_pr, token):
    """Execute RECIPE and write a checkpoint to OUTPUT (atomically).

    RECIPE may also be a mergekit config (merge_method, models/slices, ...), run unchanged.
    """
    from .execute import run as run_recipe

    if push_to:  # fail on bad push options or a missing token before the run, not after
        from .hub import check_push_args, resolve_token

        check_push_args(push_to, revision=revision, create_pr=create_pr)
        token = resolve_token(token)
    if fast_kernels:
        from .merge import use_fast_kernels
        from .recipe import load_recipe

        recipe = use_fast_kernels(load_recipe(recipe))
    result = run_recipe(recipe, out, force=force, quiet=quiet or as_json, convert_bin=convert_bin,
                        random_seed=random_seed)
    if not quiet and not as_json:
        from .report import _size

        click.echo(f"wrote {len(result.plan.entries)} tensors ({_size(result.total_bytes)}) to {result.output} "
                   f"in {result.seconds:.1f}s")
    pushed = None
    if push_to:
        from .cli_hub import echo_push
        from .hub import push

        try:
            pushed = push(result.output, push_to, token=token, private=not public, revision=revision,
                          create_pr=create_pr)
        except SurgeryError as e:
            raise SurgeryError(f"{e} (the output is written; retry with `surgery push {result.output} {push_to}`)")
        if not quiet and not as_json:
            echo_push(pushed, False)
    if as_json:
        click.echo(json.dumps({"output": str(result.output), "seconds": round(result.seconds, 3),
                               "tensors": len(result.plan.entries), "bytes": result.total_bytes,
                               "files": result.files, **({"push": pushed.to_dict()} if pushed else {})},
                              indent=2))


@cli.command(epilog="\b\nExamples:\n  surgery plan recipes/layer_swap.yaml\n  surgery plan recipe.yaml --tensors\n"
                    "  surgery plan recipe.yaml --json | jq '.layers'")
@recipe_arg
@click.option("--tensors", is_flag=True, help="One line per tensor instead of per layer.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@convert_opt
def plan(recipe, tensors, as_json, convert_bin):
    """Dry run: show where every output tensor of RECIPE comes from, and with what weights."""
    from .plan import build_plan
    from .recipe import load_recipe

    p = build_plan(load_recipe(recipe), convert_bin=convert_bin)
    click.echo(json.dumps(p.to_dict(), indent=2) if as_json else p.format(tensors=tensors))


@cli.command(epilog="\b\nExample:\n  surgery validate recipes/adamergex.yaml")
@recipe_arg
@convert_opt
def validate(recipe, convert_bin):
    """Check RECIPE: schema, inputs, layer indices, tensor names and shapes. Writes nothing."""
    from .plan import build_plan
    from .recipe import load_recipe

    p = build_plan(load_recipe(recipe), convert_bin=convert_bin)
    click.echo(f"ok: {recipe} ({len(p.recipe.operations)} operations, {len(p.entries)} output tensors)")


@cli.command()
def schema():
    """Print the JSON Schema of the recipe format."""
    from .recipe import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@cli.command(epilog="\b\nExample:\n  surgery demo --dir demo")
@click.option("--dir", "folder", default="demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the demo checkpoints and output go.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def demo(folder, quiet):
    """Make tiny demo checkpoints (base, math, swahili, english) and run a layer swap on them."""
    from pathlib import Path

    from .demo import DEMO_RECIPE, make_demo
    from .execute import run as run_recipe
    from .plan import build_plan
    from .recipe import load_recipe

    folder = Path(folder)
    paths = make_demo(folder / "checkpoints")
    click.echo(f"made demo checkpoints in {folder / 'checkpoints'}: {', '.join(paths)}")
    click.echo("  swahili/english: language experts, changed mostly in layers 0-1 and 6-7; "
               "math: task expert, changed mostly in layers 3-4")
    adapters = sorted(p.name for p in (folder / "checkpoints").glob("lora-*"))
    if adapters:
        click.echo(f"  PEFT LoRA adapters of the experts: {', '.join(adapters)}")
    recipe_path = folder / "layer_swap.yaml"
    recipe_path.write_text(DEMO_RECIPE)
    recipe = load_recipe(recipe_path)
    click.echo(f"\nrecipe {recipe_path}:\n{build_plan(recipe).format()}\n")
    result = run_recipe(recipe, folder / "out" / "math-swahili-swap", force=True, quiet=quiet)
    click.echo(f"wrote {len(result.plan.entries)} tensors to {result.output} in {result.seconds:.1f}s")
    click.echo(f"  files: {', '.join(result.files)}")
    from .demo import check_loads

    click.echo(f"  {check_loads(result.output)}")


# Feature modules that add commands with @cli.command(); each imports only click at the top.
COMMAND_MODULES: list[str] = ["surgery.cli_hub", "surgery.cli_mergekit", "surgery.cli_adapters", "surgery.cli_analysis",
                              "surgery.cli_eval", "surgery.cli_search"]


def _load_commands() -> None:
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main():
    import signal

    # SIGTERM unwinds like Ctrl-C, so a half-written output's temp dir is removed
    signal.signal(signal.SIGTERM, _interrupt)
    _load_commands()
    cli(prog_name="surgery")


if __name__ == "__main__":
    main()
