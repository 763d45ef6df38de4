"""`surgery run | plan | validate | schema | demo`: recipes in, checkpoints out."""

from __future__ import annotations

import json

import click

from surgery.cli.options import (convert_opt, mergekit_lenient_opt, plan_threads_opt, push_options, recipe_arg,
                                 run_threads_opt, show_progress, threads_opt)
from surgery.errors import SurgeryError


@click.command(epilog="\b\nExamples:\n  surgery run recipes/layer_swap.yaml -o out/swapped\n"
                    "  surgery run recipe.yaml -o out/ --force --quiet --json\n"
                    "  surgery run recipe.yaml -o out/merged --push-to me/merged-model\n"
                    "  surgery run mergekit-config.yml -o out/ --random-seed 42\n"
                    "  surgery run published-mergekit.yml -o out/ --mergekit-lenient\n"
                    "  surgery run ties.yml -o out/ --device auto\n"
                    "  surgery run ties.yml -o out/ --workers 4 --shard-size 2GB")
@recipe_arg
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--random-seed", type=int, default=None,
              help="Seed for random merge methods (DARE, DELLA); overrides the recipe's 'seed'.")
@click.option("--fast-kernels", is_flag=True,
              help="TIES by selection instead of sorting: faster; entries exactly at the density threshold may differ from mergekit.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where merge operations compute: cuda streams their inputs to the GPU; auto uses it when present.")
@click.option("--backend", type=click.Choice(["auto", "numpy", "torch", "mergekit"]), default=None,
              help="Which implementations compute (the same bytes at every level; for comparisons and debugging): "
                   "auto = compiled kernels, then numpy, torch, mergekit's own; numpy = no compiled kernels; torch = "
                   "no numpy math; mergekit = merge methods through mergekit's kernels only. Default: "
                   "$SURGERY_BACKEND, else auto. `surgery backends` lists them.")
@click.option("--shard-size", metavar="SIZE", help="Maximum size of an output shard, e.g. 2GB (default: the "
                                                    "recipe's output.shard_size, else 5GB, as huggingface_hub).")
@click.option("--workers", type=click.IntRange(min=1), metavar="N", help="Write the output shards as Ray tasks, N at once, on "
                                                            "a local Ray (same bytes as without).")
@click.option("--ray-address", metavar="ADDR", help="Write the output shards as tasks of this Ray cluster ('auto' "
                                                    "or host:port) instead; inputs and output on shared storage.")
@convert_opt
@click.option("--allow-nonfinite", is_flag=True, help="Write NaN/Inf values instead of refusing the output.")
@mergekit_lenient_opt
@run_threads_opt
@click.option("--push-to", metavar="REPO_ID", help="After a successful run, push the output to this Hub repo "
                                                   "(see `surgery push --help`).")
@push_options
def run(recipe, out, force, quiet, as_json, convert_bin, random_seed, fast_kernels, device, backend, shard_size, workers,
        ray_address, allow_nonfinite, mergekit_lenient, push_to, public, revision, create_pr, token):
    """Execute RECIPE and write a checkpoint to OUTPUT (atomically).

    RECIPE may also be a mergekit config (merge_method, models/slices, ...), run unchanged.
    """
    from surgery.pipeline import run as run_recipe

    if push_to:  # fail on bad push options or a missing token before the run, not after
        from surgery.io.hub import check_push_args, resolve_token

        check_push_args(push_to, revision=revision, create_pr=create_pr)
        token = resolve_token(token)
    if fast_kernels:
        from surgery.operations.merge import use_fast_kernels
        from surgery.loader import load_recipe

        recipe = use_fast_kernels(load_recipe(recipe, mergekit_lenient=mergekit_lenient))
    result = run_recipe(recipe, out, force=force, quiet=not show_progress(quiet, as_json),
                        convert_bin=convert_bin, random_seed=random_seed, allow_nonfinite=allow_nonfinite,
                        device=device, backend=backend, workers=workers or 0, ray_address=ray_address,
                        shard_size=shard_size, mergekit_lenient=mergekit_lenient)
    if not quiet and not as_json:
        from surgery.io.output import format_size

        click.echo(f"wrote {len(result.plan.entries)} tensors ({format_size(result.total_bytes)}) to {result.output} "
                   f"in {result.seconds:.1f}s")
    pushed = None
    if push_to:
        from surgery.cli.hub import echo_push
        from surgery.io.hub import push

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


@click.command(epilog="\b\nExamples:\n  surgery plan recipes/layer_swap.yaml\n  surgery plan recipe.yaml --tensors\n"
                    "  surgery plan recipe.yaml --json | jq '.layers'")
@recipe_arg
@click.option("--tensors", is_flag=True, help="One line per tensor instead of per layer.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@convert_opt
@mergekit_lenient_opt
@plan_threads_opt
def plan(recipe, tensors, as_json, convert_bin, mergekit_lenient):
    """Dry run: show where every output tensor of RECIPE comes from, and with what weights."""
    from surgery.pipeline import build_plan
    from surgery.loader import load_recipe

    p = build_plan(load_recipe(recipe, mergekit_lenient=mergekit_lenient), convert_bin=convert_bin)
    click.echo(json.dumps(p.to_dict(), indent=2) if as_json else p.format(tensors=tensors))


@click.command(epilog="\b\nExample:\n  surgery validate recipes/adamergex.yaml")
@recipe_arg
@convert_opt
@mergekit_lenient_opt
@plan_threads_opt
def validate(recipe, convert_bin, mergekit_lenient):
    """Check RECIPE: schema, inputs, layer indices, tensor names and shapes. Writes nothing."""
    from surgery.pipeline import build_plan
    from surgery.loader import load_recipe

    p = build_plan(load_recipe(recipe, mergekit_lenient=mergekit_lenient), convert_bin=convert_bin)
    click.echo(f"ok: {recipe} ({len(p.recipe.operations)} operations, {len(p.entries)} output tensors)")


@click.command()
def schema():
    """Print the JSON Schema of the recipe format."""
    from surgery.loader import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@click.command(epilog="\b\nExample:\n  surgery demo --dir demo")
@click.option("--dir", "folder", default="demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the demo checkpoints and output go.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@threads_opt
def demo(folder, quiet):
    """Make tiny demo checkpoints (base, math, swahili, english) and run a layer swap on them."""
    from pathlib import Path

    from surgery.demo import DEMO_RECIPE, check_loads, make_demo
    from surgery.io.output import demo_folder
    from surgery.pipeline import build_plan
    from surgery.pipeline import run as run_recipe
    from surgery.loader import load_recipe

    progress = show_progress(quiet)  # the run's bar and the libraries' (surgery.io.progress)
    with demo_folder(Path(folder)) as folder:  # new, empty or a previous demo; removed if the demo fails
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
        result = run_recipe(recipe, folder / "out" / "math-swahili-swap", force=True, quiet=not progress)
        click.echo(f"wrote {len(result.plan.entries)} tensors to {result.output} in {result.seconds:.1f}s")
        click.echo(f"  files: {', '.join(result.files)}")
        click.echo(f"  {check_loads(result.output)}")
