"""`surgery mergekit`: mergekit's own merge pipeline, with surgery's methods registered and surgery's
input checks and atomic output around it.

    run_mergekit("config.yml", "out/merged")          # == mergekit-yaml config.yml out/merged
"""

from __future__ import annotations

import os
from pathlib import Path

from surgery.errors import SurgeryError, did_you_mean
from surgery.mergekit.methods import register_all
from surgery.io.files import read_text
from surgery.io.output import atomic_dir, check_target
from surgery.recipe.locations import MAX_RECIPE_BYTES, parse_yaml


def run_mergekit(config, out, *, options=None, force: bool = False) -> Path:
    """Run mergekit's own merge (what ``mergekit-yaml CONFIG OUT`` does) with surgery's methods registered.

    ``config``: a path to a mergekit YAML file, a YAML string or a dict. ``options``: a
    ``mergekit.options.MergeOptions``, a dict of its fields, or None. The output appears at ``out``
    only when the merge succeeded (built in a temp dir beside it, then renamed).
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from pydantic import ValidationError

    register_all()
    source_name = None
    if isinstance(config, dict):
        data, text = config, None
    else:
        path = Path(config) if not (isinstance(config, str) and "\n" in config) else None
        if path is not None:
            if not os.path.lexists(path):
                raise SurgeryError(f"mergekit config not found: {path}")
            text, source_name = read_text(path, max_bytes=MAX_RECIPE_BYTES), str(path)
        else:
            text = str(config)
        data, _ = parse_yaml(text, source_name or "config")  # plain YAML: no tags, bounded aliases and depth
    where = source_name or "mergekit config"
    try:
        merge_config = MergeConfiguration.model_validate(data)
    except (ValidationError, RuntimeError) as e:
        raise SurgeryError(f"{where}: {_first_line(e)}") from None
    _check_parameter_names(merge_config, where)
    if not isinstance(options, MergeOptions):
        bad = sorted(set(options or {}) - set(MergeOptions.model_fields))
        if bad:
            raise SurgeryError(f"unknown mergekit option {bad[0]!r} (options: {', '.join(MergeOptions.model_fields)})")
        options = MergeOptions(**(options or {}))
    options.apply_global_options()

    inputs = _open_models(merge_config, where)
    protect = sorted({ck.source or ck.root for ck in inputs} | ({Path(source_name)} if source_name else set()))
    check_target(out, force, inputs=protect)
    _check_tokenizer(merge_config, options, inputs, where)
    size = sum(ck.offsets[n][1] - ck.offsets[n][0] for ck in inputs[:1] for n in ck.keys())
    target = Path(out).absolute()
    with atomic_dir(target, force=force, inputs=protect, size=size, command="mergekit") as tmp:
        work = tmp / target.name  # the folder keeps the target's name: mergekit writes it into the model card
        try:
            run_merge(merge_config, str(work), options=options, config_source=text)
        except SurgeryError as e:
            raise SurgeryError(f"{where}: {e}") from e
        except Exception as e:  # noqa: BLE001 - mergekit's own failures (network, tokenizer, config): one line
            raise SurgeryError(f"{where}: mergekit: {type(e).__name__}: {_first_line(e)}") from e
        for item in work.iterdir():
            item.rename(tmp / item.name)
        work.rmdir()
    return target


def _open_models(merge_config, where: str) -> list:
    """Open every model the config names as `surgery run` opens inputs: safetensors headers validated,
    pickle-only models refused (mergekit's own loader would unpickle them)."""
    from surgery.io.checkpoint import Checkpoint, PickleRefusedError

    opened = []
    for ref in merge_config.referenced_models():
        model = ref.model
        name = f"{model.path}@{model.revision}" if getattr(model, "revision", None) else str(model.path)
        try:
            opened.append(Checkpoint.open(name))
        except PickleRefusedError:
            raise SurgeryError(f"{where}: model {name!r}: only pickle .bin weights found; `surgery mergekit` never "
                               "loads pickles (they can run code): run the config with `surgery run CONFIG -o OUT "
                               "--convert-bin`, or convert the model to safetensors first") from None
        except SurgeryError as e:
            raise SurgeryError(f"{where}: model {name!r}: {e}") from None
        if getattr(ref, "lora", None) is not None:
            raise SurgeryError(f"{where}: model {name!r}: LoRA references ('model+lora') are not supported here; "
                               "use an adapter input in a surgery recipe")
    for ck in opened:
        ck.close()
    return opened


def _check_tokenizer(merge_config, options, opened, where: str) -> None:
    """mergekit copies the base model's tokenizer and fails with a traceback when it has none."""
    if getattr(merge_config, "tokenizer_source", None) or getattr(merge_config, "tokenizer", None):
        return
    if not options.copy_tokenizer or not opened:
        return
    from surgery.io.output import TOKENIZER_FILES

    base_path = str(merge_config.base_model.model.path) if merge_config.base_model else None
    base = next((ck for ck in opened if ck.ref == base_path), opened[0])
    if not any((base.root / f).is_file() for f in TOKENIZER_FILES):
        raise SurgeryError(f"{where}: model {base.ref!r} has no tokenizer files to copy; add them, or pass "
                           "--no-copy-tokenizer")


def _check_parameter_names(merge_config, where: str) -> None:
    """mergekit ignores parameters its method does not declare (a typo silently does nothing); refuse them."""
    from mergekit import merge_methods

    try:
        method = merge_methods.get(merge_config.merge_method)
    except RuntimeError:
        known = [m.spec.name for m in merge_methods.registered_methods()]
        raise SurgeryError(f"{where}: merge_method: unknown merge method {merge_config.merge_method!r}"
                           + did_you_mean(merge_config.merge_method, known)
                           + f" (known: {', '.join(sorted(known))})") from None
    valid = [p.name for p in method.spec.parameters]
    for path, params in _parameter_blocks(merge_config):
        for key in params or {}:
            if key not in valid:
                raise SurgeryError(f"{where}: {path}.{key}: {merge_config.merge_method} has no parameter {key!r}"
                                   + did_you_mean(key, valid)
                                   + f" (parameters: {', '.join(valid) or 'none'})")


def _parameter_blocks(c):
    yield "parameters", c.parameters
    for i, m in enumerate(c.models or []):
        yield f"models[{i}].parameters", m.parameters
    slices = [(f"slices[{i}]", s) for i, s in enumerate(c.slices or [])]
    for name, mod in (c.modules or {}).items():
        yield f"modules.{name}.parameters", mod.parameters
        for i, m in enumerate(mod.models or []):
            yield f"modules.{name}.models[{i}].parameters", m.parameters
        slices += [(f"modules.{name}.slices[{i}]", s) for i, s in enumerate(mod.slices or [])]
    for path, s in slices:
        yield f"{path}.parameters", s.parameters
        for j, src in enumerate(s.sources):
            yield f"{path}.sources[{j}].parameters", src.parameters


def _first_line(e: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        return f"{loc}: {err['msg']}" if loc else err["msg"]
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def options_from_args(args: list[str]):
    """MergeOptions from ``mergekit-yaml`` command-line options (e.g. ['--random-seed', '1'])."""
    import click
    from mergekit.options import MergeOptions
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    try:
        ctx = mergekit_yaml.make_context("surgery mergekit", ["CONFIG", "OUT", *args], resilient_parsing=False)
    except click.exceptions.UsageError as e:
        raise SurgeryError(f"mergekit option: {e.format_message()}") from None
    fields = {k: v for k, v in ctx.params.items() if k in MergeOptions.model_fields}
    return MergeOptions(**fields)
