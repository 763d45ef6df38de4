"""The `surgery` command line: a thin shell over the Python API.

Only click is imported at start-up; torch, transformers and mergekit load inside commands.
"""

from __future__ import annotations

import warnings

import click

from surgery.errors import SurgeryError

EPILOG = """\b
Examples:
  surgery demo                                   # tiny demo checkpoints + a layer swap
  surgery validate recipes/layer_swap.yaml
  surgery plan recipes/layer_swap.yaml           # where every tensor comes from
  surgery run recipes/layer_swap.yaml -o out/swapped
  surgery schema > recipe.schema.json            # for editor autocompletion
  surgery diff demo/checkpoints/base sw=demo/checkpoints/swahili --plot diff.png
  surgery data mo --langs de,fr -o data/         # parallel text from gettext catalogs
  surgery probe base/ --text en=data/en.txt --text de=data/de.txt --save-neurons lape/
  surgery run mergekit-config.yml -o out/merged  # mergekit configs run unchanged
  surgery push out/swapped me/math-sw            # upload with a model card
  surgery eval out/swapped recipe.yaml --data sw=texts/sw.txt   # measure (recipes in memory)
  surgery search search.yaml -o runs/sw-swap     # find the best values of a recipe (resumable)
"""


class SurgeryGroup(click.Group):
    """Turns user errors into one line on stderr and exit code 1 (tracebacks with --debug)."""

    def invoke(self, ctx):
        showwarning = warnings.showwarning
        try:
            return super().invoke(ctx)
        except SurgeryError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)
        except OSError as e:  # the file system refused something no check could foresee (a race, a device)
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e.filename or 'file system'}: {e.strerror or e}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            ctx.exit(130)
        finally:
            warnings.showwarning = showwarning  # the CLI's one-line warnings end with the command
            from surgery.io.progress import forget

            forget()  # the command's progress-bar decision (cli.options.show_progress) ends with it


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


# Every command is defined in a module of this package and added here; each imports only click at the top.
from surgery.cli import adapters, analysis, backends, hub, mergekit, probe, recipe, search  # noqa: E402
from surgery.cli import eval as eval_cli  # noqa: E402

for _command in (recipe.run, recipe.plan, recipe.validate, recipe.schema, recipe.demo, analysis.diff, hub.push,
                 mergekit.mergekit, adapters.extract_lora, adapters.adamergex, eval_cli.eval_command,
                 search.search, probe.probe, probe.data, backends.backends):
    cli.add_command(_command)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main():
    import signal

    # SIGTERM unwinds like Ctrl-C, so a half-written output's temp dir is removed
    signal.signal(signal.SIGTERM, _interrupt)
    cli(prog_name="surgery")
