"""`surgery diff`: where did each expert change relative to the base?"""

from __future__ import annotations

import click

from surgery.cli.options import show_progress, threads_opt


DIFF_EPILOG = """\b
Examples:
  surgery diff base/ math/ sw/                      # table: layers ranked, groups, pairs
  surgery diff base/ math=ckpt/math sw=ckpt/swahili --plot diff.png
                                                    # diff.png (heatmap) + diff_layers.png
  surgery diff base/ sw/ --top-k 0.01 --json > sw.json
                                                    # 1% most-changed MLP neurons per layer
  surgery diff base/ sw/ --csv stats.csv --no-heads
  surgery diff base/ sw-lora=out/sw-lora              # a PEFT adapter, applied to base/
  surgery diff base/ sw/ --top-k 50 --save-neurons sw_neurons.json
                                                    # a neuron set for transplant_neurons/reset_neurons
"""


def _parse_k(text: str):
    try:
        v = float(text)
    except ValueError:
        raise click.BadParameter(f"expected a count like 50 or a fraction like 0.01, got {text!r}") from None
    if v <= 0 or (v >= 1 and not v.is_integer()):
        raise click.BadParameter(f"expected a count >= 1 or a fraction between 0 and 1, got {text!r}")
    return int(v) if v >= 1 else v


@click.command(epilog=DIFF_EPILOG)
@click.argument("base")
@click.argument("experts", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True,
              help="Print the results as JSON (schema surgery.diff/1, docs/analysis.md).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False),
              help="Write per-tensor, per-layer and total statistics as CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a heatmap PNG here and a per-layer line plot next to it (<name>_layers.png).")
@click.option("-k", "--top-k", "top_k", default="10", show_default=True, metavar="K",
              help="Neurons/heads to rank per layer: a count (50) or a fraction (0.01).")
@click.option("--global", "global_k", is_flag=True, help="Rank top-k over all layers together, not per layer.")
@click.option("--metric", type=click.Choice(["relative", "delta_norm", "mean_abs", "max_abs", "frac_changed"]),
              default="relative", show_default=True, help="What ranks layers and colours the plots.")
@click.option("--neurons/--no-neurons", default=True, show_default=True, help="Score MLP intermediate neurons.")
@click.option("--heads/--no-heads", default=True, show_default=True, help="Score attention heads.")
@click.option("--tol", type=float, default=0.0, show_default=True, help="An entry counts as changed when |Δ| > tol.")
@click.option("--save-neurons", type=click.Path(dir_okay=False),
              help="Write the top-k neurons of the (single) expert as a neuron-set JSON file for recipes.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@threads_opt
def diff(base, experts, as_json, csv_path, plot_path, top_k, global_k, metric, neurons, heads, tol, save_neurons,
         quiet):
    """Compare EXPERT checkpoints with BASE, tensor by tensor, in bounded memory.

    Each EXPERT is a path or Hub id, a PEFT adapter folder on BASE, or a recipe .yaml (its result),
    optionally named: name=path. Reports per tensor, layer and
    module group the change ‖Δ‖, ‖Δ‖/‖W‖, mean and max |Δ|, cosine to the base and the share of
    entries changed; ranks layers, MLP neurons and attention heads; and, between experts, the
    cosine and sign agreement of their task vectors and the overlap of their top-k neurons.
    """
    import json

    from surgery.analysis.diff import diff as run_diff
    from surgery.errors import SurgeryError

    k = _parse_k(top_k)
    named = {}
    for item in experts:
        name, sep, ref = item.partition("=")
        if not sep:
            from pathlib import Path

            name, ref = Path(item.rstrip("/")).name or item, item
        if not name or not ref:
            raise SurgeryError(f"expert {item!r}: expected PATH or NAME=PATH")
        if name in named:
            raise SurgeryError(f"two experts are named {name!r}; name them with NAME=PATH")
        named[name] = ref
    if save_neurons and len(named) != 1:
        raise SurgeryError("--save-neurons needs exactly one expert")
    if save_neurons and not neurons:
        raise SurgeryError("--save-neurons needs neuron scores; drop --no-neurons")
    from surgery.pipeline import open_source

    base_ck = open_source(base)
    sources = {name: open_source(ref, base=base_ck) for name, ref in named.items()}  # adapters apply to BASE
    result = run_diff(base_ck, sources, tol=tol, neurons=neurons, heads=heads,
                      progress=show_progress(quiet, as_json))
    if csv_path:
        result.to_csv(csv_path)
    if plot_path:
        from pathlib import Path

        p = Path(plot_path)
        result.plot_heatmap(p, metric)
        result.plot_layers(p.with_name(p.stem + "_layers" + (p.suffix or ".png")), metric)
    if save_neurons:
        from surgery.analysis.neuron_set import save_neuron_set

        (name,) = named
        save_neuron_set(save_neurons, result.top_neurons(name, k, per_layer=not global_k),
                        source=f"surgery diff {base} {named[name]} --top-k {top_k}")
    if as_json:
        click.echo(json.dumps(result.to_dict(k, per_layer=not global_k), indent=2))
    else:
        click.echo(result.format_table(k, metric))
        written = [x for x in (csv_path, plot_path, save_neurons) if x]
        if written:
            click.echo("\nwrote " + ", ".join(written))
