"""`surgery eval`: measure checkpoints and recipes (in memory) on local data and lm-eval tasks."""

from __future__ import annotations

import json

import click

from surgery.cli.options import show_progress, threads_opt

EPILOG = """\b
Examples:
  surgery eval base/ math/ out/swap --data sw=texts/sw.txt --data mgsm_sw=tasks/mgsm_sw.jsonl
  surgery eval recipes/layer_swap.yaml --data sw=texts/sw.txt    # in memory, nothing written
  surgery eval out/swap --lm-eval arc_easy_sw --include-path tasks/ --limit 200
  surgery eval demo/checkpoints/base demo/layer_swap.yaml --data demo.txt --json --plot eval.png

\b
Data files (the kind is told from the keys; docs/eval.md):
  .txt                                  one document a line: perplexity, bits_per_byte
  .jsonl {"text"}                       the same
  .jsonl {"prompt", "answer"}           greedy generation: exact_match, numeric_match
  .jsonl {"prompt", "choices", "label"} multiple choice: acc, acc_norm
"""


@click.command("eval", epilog=EPILOG)
@click.argument("targets", nargs=-1, required=True, metavar="TARGET...")
@click.option("--data", "data", multiple=True, metavar="NAME=PATH",
              help="A local data set (.txt or .jsonl); repeatable.")
@click.option("--lm-eval", "lm_eval", metavar="TASKS", help="lm-evaluation-harness tasks, comma-separated.")
@click.option("--include-path", type=click.Path(file_okay=False), help="Folder of local lm-eval task YAMLs.")
@click.option("--limit", type=click.IntRange(min=1),
              help="Items per data set (a random subset, see --seed) and per task.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --limit subsets and lm-eval.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True, help="Compute dtype (auto: as stored).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-length", type=click.IntRange(min=2),
              help="Tokens per window (default: the model's, at most 2048).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Greedy generation length.")
@click.option("--chat", is_flag=True, help="Wrap prompts in the tokenizer's chat template.")
@click.option("--tokenizer", type=click.Path(file_okay=False), help="Use this folder's tokenizer for every target.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema surgery.eval/1).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the scores as CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Also write grouped bars as PNG.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@threads_opt
def eval_command(targets, data, lm_eval, include_path, limit, seed, device, dtype, batch_size, max_length,
                 max_new_tokens, chat, tokenizer, as_json, csv_path, plot_path, quiet):
    """Evaluate each TARGET (a checkpoint directory, or a recipe built in memory without writing it)
    and print one table: a row per target, a column per data set and metric."""
    from pathlib import Path

    from surgery.eval import evaluate

    report = evaluate(list(targets), list(data) or None, lm_eval=lm_eval, include_path=include_path, limit=limit,
                      seed=seed, device=device, dtype=None if dtype == "auto" else dtype, batch_size=batch_size,
                      chat=chat, max_length=max_length, max_new_tokens=max_new_tokens, tokenizer=tokenizer,
                      quiet=not show_progress(quiet, as_json))
    if csv_path:
        Path(csv_path).write_text(report.to_csv())
    if plot_path:
        report.plot(plot_path)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.format())
