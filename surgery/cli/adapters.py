"""CLI commands for adapters: `surgery extract-lora` and `surgery adamergex`."""

from __future__ import annotations

import json

import click

from surgery.cli.options import show_progress, threads_opt


DTYPES = click.Choice(["float32", "float16", "bfloat16"])


@click.command("extract-lora", epilog="""\b
Examples:
  surgery extract-lora models/base models/sw-expert -o out/sw-lora --rank 16
  surgery extract-lora models/base models/sw-expert -o out/sw-lora --energy 0.9 --modules attn,mlp
  surgery extract-lora models/base recipes/adamergex.yaml -o out/lora --rank 8   # a recipe's result
  surgery extract-lora models/base out/ner-sw-adapter -o out/ner-sw-r8 --rank 8   # shrink an adapter
  surgery extract-lora models/base models/sw-expert -o out/sw-lora --rank 16 --json | jq '.layers'
""")
@click.argument("base")
@click.argument("tuned")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False),
              help="Adapter directory to write.")
@click.option("--rank", type=int, help="LoRA rank (with --energy: the largest rank allowed).")
@click.option("--energy", type=float, help="Keep the fewest singular values holding this fraction of ‖ΔW‖² (0-1].")
@click.option("--modules", default="attn,mlp", show_default=True,
              help="Module kinds or groups to extract, comma-separated (attn, mlp, attn_q, lm_head, embed, ...).")
@click.option("--dtype", type=DTYPES, default="float32", show_default=True, help="dtype of the LoRA factors.")
@click.option("--svd", type=click.Choice(["full", "lowrank"]), default="full", show_default=True,
              help="'lowrank': randomized SVD, much faster on large matrices (needs --rank); "
                   "the error is still measured.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-layer and per-tensor report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@threads_opt
def extract_lora(base, tuned, out, rank, energy, modules, dtype, svd, force, as_json, quiet):
    """Extract TUNED − BASE as a PEFT LoRA adapter by truncated SVD.

    TUNED is a checkpoint (local dir, file or Hub id), a recipe .yaml whose result is used
    without writing it, or an adapter directory on BASE (to re-rank an adapter). Prints the relative
    reconstruction error ‖ΔW − B·A‖/‖ΔW‖ per layer.
    """
    from surgery.errors import SurgeryError
    from surgery.pipeline import extract_lora as extract

    from tqdm.auto import tqdm

    if rank is None and energy is None:
        raise SurgeryError("give --rank R or --energy F")
    with tqdm(desc="extract-lora", unit="tensor", disable=not show_progress(quiet, as_json), leave=False) as bar:
        def progress(done: int, total: int, name: str) -> None:
            bar.total, bar.n = total, done
            bar.set_postfix_str(name, refresh=True)

        result = extract(base, tuned, out, rank=rank, energy=energy,
                         modules=tuple(m.strip() for m in modules.split(",") if m.strip()), dtype=dtype, svd=svd,
                         force=force, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(f"wrote LoRA adapter ({len(result.rows)} modules) to {result.output}")
    click.echo(f"{'layer':>6}  {'tensors':>7}  {'rank':>9}  {'mean rel err':>12}  {'max rel err':>11}")
    for row in result.by_layer():
        ranks = row["ranks"]
        r = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        layer = "-" if row["layer"] is None else str(row["layer"])
        click.echo(f"{layer:>6}  {row['tensors']:>7}  {r:>9}  {row['mean_rel_error']:>12.4f}  "
                   f"{row['max_rel_error']:>11.4f}")
    if result.skipped:
        worst = max(result.skipped, key=lambda s: s["rel_change"])
        click.echo(f"not in the adapter: {len(result.skipped)} changed tensors LoRA cannot carry or not selected "
                   f"(largest relative change {worst['rel_change']:.3g} in {worst['name']})")


@click.command(epilog="""\b
Examples:
  surgery adamergex adapters/ner-en adapters/lm-sw adapters/lm-en -o out/ner-sw
  surgery adamergex adapters/ner-en adapters/lm-sw adapters/lm-en -o out/ner-sw -t 0.5 --mode factors
For a merged checkpoint instead of an adapter, use the `adamergex` recipe operation
(recipes/adamergex_adapters.yaml).
""")
@click.argument("task")
@click.argument("target_ref")
@click.argument("source_ref")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False),
              help="Adapter directory to write.")
@click.option("-t", "t", type=float, default=1.0, show_default=True, help="Weight of the language difference.")
@click.option("--mode", type=click.Choice(["delta", "factors"]), default="delta", show_default=True,
              help="LoRA: 'delta' is exact on ΔW (rank r₁+r₂+r₃); 'factors' adds A and B separately, as the "
                   "original implementation. Ignored for (IA)³.")
@click.option("--dtype", type=DTYPES, help="dtype of the written tensors. Default: the task adapter's.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@threads_opt
def adamergex(task, target_ref, source_ref, out, t, mode, dtype, force, as_json):
    """AdaMergeX on adapters: TASK ⊕ t·(TARGET_REF ⊖ SOURCE_REF), written as a PEFT adapter.

    TASK is the task adapter trained in the source language; TARGET_REF and SOURCE_REF are
    adapters for one reference task in the target and source languages.
    """
    from surgery.adapters.adamergex import adamergex_adapter

    r = adamergex_adapter(task, target_ref, source_ref, out, t=t, mode=mode, dtype=dtype, force=force)
    if as_json:
        click.echo(json.dumps({"output": str(r.output), "peft_type": r.peft_type, "modules": r.modules,
                               "ranks": r.ranks}, indent=2))
    else:
        ranks = sorted(set(r.ranks.values()))
        extra = f", rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}" if ranks else ""
        click.echo(f"wrote {r.peft_type} adapter ({r.modules} modules{extra}) to {r.output}")
