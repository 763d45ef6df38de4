"""`surgery probe` (activation analysis) and `surgery data mo` (parallel text from gettext catalogs)."""

from __future__ import annotations

import json

import click

from surgery.cli.options import show_progress
from surgery.errors import SurgeryError

PROBE_EPILOG = """\b
Examples:
  surgery data mo --langs de,fr,es -o data/
  surgery probe base/ --text en=data/en.txt --text de=data/de.txt --text fr=data/fr.txt \\
                --parallel data/en-de.jsonl --plot probe.png --json --save-neurons lape/
                                                  # lape/de.json: reset_neurons {to: zero, neurons: {file: ...}}
  surgery probe base/ sw=ckpt/swahili --text en=en.txt --text sw=sw.txt --csv probe.csv
                                                  # several models: one table each, overlaid plots
  surgery probe base/ --labels topics.jsonl --no-lape --max-tokens 64 --device cuda
  surgery probe base/ recipes/layer_swap.yaml --text en=en.txt --text sw=sw.txt
                                                  # a recipe's output, built in memory (nothing written)
"""


def _pairs(values, option: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, path = v.partition("=")
        if not sep or not key or not path:
            raise click.BadParameter(f"expected LANG=FILE, got {v!r}", param_hint=option)
        if key in out:
            raise click.BadParameter(f"{key!r} is given twice", param_hint=option)
        out[key] = path
    return out


@click.command(epilog=PROBE_EPILOG)
@click.argument("models", nargs=-1, required=True)
@click.option("--text", "texts", multiple=True, metavar="LANG=FILE",
              help="Texts of one language, one per line (repeat for each language).")
@click.option("--labels", type=click.Path(dir_okay=False), help="JSONL {text, label} to probe instead of the languages.")
@click.option("--parallel", multiple=True, type=click.Path(dir_okay=False),
              help="JSONL translation pairs, e.g. {\"en\": ..., \"de\": ...} per line (repeatable).")
@click.option("--lape/--no-lape", default=True, show_default=True, help="Find language-specific neurons (needs >= 2 --text).")
@click.option("--probing/--no-probing", default=True, show_default=True, help="Layer-wise linear probes.")
@click.option("--top-rate", type=float, default=0.01, show_default=True, help="LAPE: share of all neurons kept by lowest entropy.")
@click.option("--filter-rate", type=float, default=0.95, show_default=True,
              help="LAPE: a neuron must exceed this quantile of activation probability in some language.")
@click.option("--bar-rate", type=float, default=0.95, show_default=True,
              help="LAPE: a kept neuron belongs to each language whose probability exceeds this quantile.")
@click.option("--folds", type=int, default=5, show_default=True, help="Cross-validation folds of the probes.")
@click.option("--limit", type=int, default=None, help="Use the first N texts (pairs) of each file.")
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu, cuda, cuda:1, mps.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-tokens", type=int, default=128, show_default=True, help="Truncate each text to this many tokens.")
@click.option("--tokenizer", help="Tokenizer path or Hub id (default: each model's own).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG with one panel per analysis.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (format surgery.probe/1).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write long-format CSV: model, analysis, key, layer, metric, value.")
@click.option("--save-neurons", type=click.Path(file_okay=False),
              help="Write DIR/<lang>.json (DIR/<model>/<lang>.json for several models), format surgery.neurons/1.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def probe(models, texts, labels, parallel, lape, probing, top_rate, filter_rate, bar_rate, folds, limit, device, dtype,
          batch_size, max_tokens, tokenizer, plot_path, as_json, csv_path, save_neurons, quiet):
    """Run MODELS forward over texts: language-specific neurons, layer-wise probes, cross-lingual alignment.

    Each MODEL is a checkpoint (folder, .safetensors file or Hub id) or a recipe (its output built in
    memory, the bytes `surgery run` writes), optionally named: name=path. Inference only; memory is bounded
    by one batch. Outputs: a table (or --json), --csv, --plot, and --save-neurons for recipes.
    """
    from pathlib import Path

    from surgery.analysis.neuron_set import save_neuron_set
    from surgery.probing import LapeSettings
    from surgery.probing import probe as run_probe

    if limit is not None and limit < 1:
        raise click.BadParameter("must be at least 1", param_hint="--limit")
    settings = LapeSettings(top_rate, filter_rate, bar_rate)
    text_files = _pairs(texts, "--text")
    if save_neurons and (not lape or len(text_files) < 2):
        raise SurgeryError("--save-neurons needs LAPE: texts in at least two languages (--text LANG=FILE)")
    result = run_probe(list(models), text_files, labels=labels, parallel=list(parallel), lape=lape, probing=probing,
                       device=device, dtype=dtype, batch_size=batch_size, max_tokens=max_tokens, tokenizer=tokenizer,
                       folds=folds, lape_settings=settings, limit=limit, progress=show_progress(quiet, as_json))
    written = []
    if csv_path:
        result.to_csv(csv_path)
        written.append(csv_path)
    if plot_path:
        written += result.plot(plot_path)
    if save_neurons:
        for name, m in result.models.items():
            folder = Path(save_neurons) / (name if len(result.models) > 1 else "")
            folder.mkdir(parents=True, exist_ok=True)
            for lang, neurons in m.lape.neurons.items():
                written.append(str(save_neuron_set(folder / f"{lang}.json", neurons,
                                                   source=f"surgery probe {m.path} (LAPE, language {lang})")))
    if as_json:
        click.echo(result.to_json())
    else:
        click.echo(result.format_table())
        if written:
            click.echo("\nwrote " + ", ".join(written))


@click.group()
def data():
    """Make data sets for `surgery probe`."""


@data.command("mo", epilog="\b\nExamples:\n  surgery data mo --langs de,fr,es -o data/\n"
                           "  surgery data mo --mo de=po/de.mo --mo fr=po/fr.mo -o data/ --json\n"
                           "  surgery data mo --langs ja --min-words 3 --limit 500 -o data/")
@click.option("--langs", default="", metavar="LANGS", help="Comma-separated locale names (directories of --locale-dir).")
@click.option("--mo", "mo_files", multiple=True, metavar="LANG=FILE", help="An explicit .mo file for a language (repeatable).")
@click.option("--locale-dir", default="/usr/share/locale", show_default=True, type=click.Path(file_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--min-words", type=int, default=2, show_default=True, help="Drop English strings with fewer words.")
@click.option("--min-chars", type=int, default=10, show_default=True, help="Drop English strings with fewer characters.")
@click.option("--limit", type=int, default=None, help="At most N pairs per language.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def data_mo(langs, mo_files, locale_dir, out, min_words, min_chars, limit, as_json):
    """Parallel English-X sentences from gettext catalogs (.mo), for probing and alignment.

    Pairs each English msgid with its translation; strips format specifiers, markup and
    accelerators; drops help tables, untranslated entries, duplicates and short strings. Writes
    <lang>.txt, en.txt and en-<lang>.jsonl to OUTPUT.
    """
    from surgery.probing.mo_data import write_mo_data

    files: dict[str, list[str]] = {}
    for item in mo_files:
        lang, sep, path = item.partition("=")
        if not sep or not lang or not path:
            raise click.BadParameter(f"expected LANG=FILE, got {item!r}", param_hint="--mo")
        files.setdefault(lang, []).append(path)
    names = [x.strip() for x in langs.split(",") if x.strip()]
    res = write_mo_data(names, out, files, locale_dir, min_words, min_chars, limit)
    if as_json:
        click.echo(json.dumps(res, indent=2, ensure_ascii=False))
        return
    for lang, c in res["languages"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in c["dropped"].items())
        skipped = f"; unreadable: {', '.join(c['unreadable'])}" if c["unreadable"] else ""
        click.echo(f"{lang}: {c['pairs']} pairs from {c['entries']} entries in {c['files']} .mo files "
                   f"(dropped: {dropped or 'none'}{skipped})")
    click.echo(f"en: {res['english']} unique sentences\nwrote {', '.join(res['files'])} to {res['output']}")
