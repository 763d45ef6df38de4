"""`surgery run` as a function: validate -> plan -> execute -> write -> card and manifest.

    import surgery
    plan = surgery.build_plan("recipes/layer_swap.yaml")   # == surgery plan
    result = surgery.run("recipes/layer_swap.yaml", "out/")  # == surgery run
    surgery.run("recipe.yaml", "out/", workers=2, shard_size="1GB")  # shards written by 2 local Ray workers
    result.output, result.seconds, result.total_bytes
"""

from __future__ import annotations

import datetime as _dt
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from surgery import __version__
from surgery.core.cluster import start_ray, stop_ray
from surgery.core.devices import resolve_device
from surgery.core.distribute import execute_on_ray
from surgery.core.execute import PlanReader, execute
from surgery.core.layout import layout_data
from surgery.core.plan import Plan, make_plan
from surgery.errors import SurgeryError
from surgery.core.model_card import write_model_card
from surgery.io.checkpoint import Checkpoint, TensorSource
from surgery.io.output import atomic_dir, check_target, copy_support_files, write_json
from surgery.io.reference import resolve_reference
from surgery.operations.vocab import check_vocabulary, write_tokenizer
from surgery.loader import Stages, load_recipe, read_recipe
from surgery.recipe.parsing import parse_size
from surgery.recipe.schema import Recipe

MANIFEST_NAME = "surgery_manifest.json"
RECIPE_NAME = "surgery_recipe.yaml"


def open_inputs(recipe: Recipe, *, convert_bin: bool = False, opened: dict | None = None) -> dict:
    """Open every input of a recipe: checkpoints first, then adapters over the checkpoints they apply to.
    ``opened``: inputs already open (by name), e.g. an earlier stage's output."""
    out = dict(opened or {})
    for name, ref in recipe.inputs.items():
        if not isinstance(ref, str) or name in out:
            continue
        try:
            out[name] = Checkpoint.open(ref, convert_bin=convert_bin, base_dir=recipe.base_dir)
        except SurgeryError as e:
            raise recipe.error(("inputs", name), str(e)) from None
    for name, spec in recipe.inputs.items():
        if isinstance(spec, str):
            continue
        from surgery.adapters.view import open_adapter_input  # only recipes with adapter inputs need it

        try:
            out.update(open_adapter_input(name, spec, out, base_dir=recipe.base_dir, convert_bin=convert_bin))
        except SurgeryError as e:
            raise recipe.error(("inputs", name), str(e)) from None
    return out


def open_source(ref, *, base: TensorSource | None = None, convert_bin: bool = False) -> TensorSource:
    """What a user names as a model (resolved by ``surgery.io.reference``): a checkpoint (directory,
    .safetensors file, Hub id), a recipe (its result, computed on demand), or, given ``base``, a PEFT
    adapter directory (base + ΔW)."""
    if isinstance(ref, TensorSource):
        return ref
    found = resolve_reference(ref)
    if found.kind == "recipe":
        plan = build_plan(ref, convert_bin=convert_bin)
        if len(plan.layer_map) != plan.n_source_layers:
            raise SurgeryError(f"{ref}: the recipe changes the layer count; use its written output instead")
        return PlanReader(plan, str(ref))
    if isinstance(base, Checkpoint) and found.path is not None and (found.path / "adapter_config.json").is_file():
        from surgery.adapters.view import open_adapter

        return open_adapter(ref, base)
    return Checkpoint.open(ref, convert_bin=convert_bin)


def extract_lora(base, tuned, out, **options):
    """``tuned − base`` as a PEFT LoRA adapter in ``out``; ``base`` and ``tuned`` are anything
    ``open_source`` opens. Options: see ``surgery.adapters.extract.extract_lora``."""
    from surgery.adapters.extract import extract_lora as extract_from_sources

    base = open_source(base)
    tuned = open_source(tuned, base=base)
    return extract_from_sources(base, tuned, out, inputs=input_paths([base, tuned]), **options)


def build_plan(recipe: Recipe | str | Path | dict, *, inputs: dict | None = None, convert_bin: bool = False,
               mergekit_lenient: bool = False) -> Plan:
    """Load the recipe if needed, open its inputs, and plan every output tensor (what `surgery plan` shows)."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, mergekit_lenient=mergekit_lenient)
    plan = make_plan(recipe, inputs or open_inputs(recipe, convert_bin=convert_bin))
    check_vocabulary(plan)
    return plan


@dataclass
class RunResult:
    output: Path
    plan: Plan
    seconds: float
    files: list[str]

    @property
    def total_bytes(self) -> int:
        return self.plan.total_bytes


def run(recipe: Recipe | str | Path | dict, out: str | Path, *, force: bool = False, quiet: bool = True,
        convert_bin: bool = False, random_seed: int | None = None, allow_nonfinite: bool = False,
        inputs: dict | None = None, device: str = "cpu", backend: str | None = None, workers: int = 0,
        ray_address: str | None = None, shard_size: int | str | None = None, mergekit_lenient: bool = False) -> RunResult:
    """Validate, plan and execute a recipe, writing a checkpoint to ``out`` atomically.

    ``random_seed`` overrides the recipe's ``seed`` (used by random merge methods). A computed tensor with
    NaN or Inf values is refused unless ``allow_nonfinite``. ``inputs``: the recipe's inputs, already open
    (default: opened here). A YAML file with several documents is a multi-stage mergekit config (see
    ``_run_stages``). ``device``: where merge operations compute, 'cpu' (default), 'cuda' or 'auto' (cuda
    when torch sees a GPU). ``backend``: which implementations may compute ('auto', 'numpy', 'torch' or 'mergekit';
    ``core.devices.BACKENDS``; default $SURGERY_BACKEND, else 'auto'); every level writes the same bytes.
    ``shard_size`` overrides the recipe's ``output.shard_size``.
    ``workers`` (a local Ray with that many CPUs) or ``ray_address`` (a running cluster: 'auto', host:port)
    writes the output shards as Ray tasks (``core.distribute``): the same bytes as a serial run.
    ``mergekit_lenient``: a mergekit config's unknown keys are ignored with a warning, as mergekit ignores
    them (see ``load_recipe``).
    """
    if backend is not None:
        from surgery.core.devices import check_backend, use_backend

        with use_backend(check_backend(backend, "backend")):
            return run(recipe, out, force=force, quiet=quiet, convert_bin=convert_bin, random_seed=random_seed,
                       allow_nonfinite=allow_nonfinite, inputs=inputs, device=device, workers=workers,
                       ray_address=ray_address, shard_size=shard_size, mergekit_lenient=mergekit_lenient)
    start = time.perf_counter()
    recipe = recipe if isinstance(recipe, Recipe) else read_recipe(recipe, mergekit_lenient=mergekit_lenient)
    if isinstance(recipe, Stages):  # several YAML documents: a multi-stage mergekit config
        return _run_stages(recipe.text, recipe.source, out, force=force, quiet=quiet, convert_bin=convert_bin,
                           random_seed=random_seed, allow_nonfinite=allow_nonfinite, device=device,
                           workers=workers, ray_address=ray_address, shard_size=shard_size,
                           mergekit_lenient=mergekit_lenient)
    if random_seed is not None:
        recipe.seed = random_seed
    if shard_size is not None:
        recipe.output.shard_size = check_shard_size(shard_size)
    if (workers or ray_address) and device != "cpu":
        raise SurgeryError(f"--device {device}: --workers/--ray-address run on CPU only (Ray tasks get no GPU)")
    out = Path(out)
    device = resolve_device(device)
    recipe_paths = [recipe._source] if recipe._text is not None and Path(str(recipe._source)).exists() else []
    plan = build_plan(recipe, inputs=inputs, convert_bin=convert_bin)
    protected = recipe_paths + input_paths(plan.inputs.values())  # what the output must not overlap
    cluster = None
    if workers or ray_address:  # Ray starts before anything is written; a bad target fails before it starts
        check_target(out, force, inputs=protected)
        cluster = start_ray(workers, ray_address)
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        with atomic_dir(out, force=force, inputs=protected, size=plan.total_bytes, command="run") as tmp:
            # hashing the inputs runs beside the tensor stream, on the other core; cancelled on an error
            hashes = {name: {f.name: pool.submit(ck.sha256, f, stop) for f in ck.files}
                      for name, ck in plan.inputs.items()}
            if cluster:
                shards = execute_on_ray(plan, tmp, cluster[0], workers=workers, quiet=quiet,
                                        allow_nonfinite=allow_nonfinite)
            else:
                shards = execute(plan, tmp, quiet=quiet, allow_nonfinite=allow_nonfinite, device=device)
            write_support_files(plan, tmp)
            recipe_text = recipe.to_yaml()
            (tmp / RECIPE_NAME).write_text(recipe_text)
            write_model_card(tmp, plan, recipe_text, name=out.name)
            manifest = build_manifest(plan, {n: {f: h.result() for f, h in fs.items()} for n, fs in hashes.items()},
                                      shards)
            for ck in plan.inputs.values():
                if isinstance(ck, Checkpoint):
                    ck.check_unchanged()  # the bytes read and the hashes are of the files opened
            write_json(tmp / MANIFEST_NAME, manifest)
            files = sorted(p.name for p in tmp.iterdir())
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        for ck in plan.inputs.values():
            ck.close()
        if cluster:
            stop_ray(*cluster)
    return RunResult(out.resolve(), plan, time.perf_counter() - start, files)


def check_shard_size(size: int | str) -> int | str:
    try:
        parse_size(size)
    except ValueError as e:
        raise SurgeryError(f"--shard-size: {e}") from None
    return size


def input_paths(sources) -> list[Path]:
    """What an output must not overlap: each checkpoint's folder (or file), adapter folder and recipe."""
    paths = []
    for src in sources:
        if isinstance(src, Checkpoint):
            paths.append(src.source or src.root)
        elif isinstance(src, PlanReader):
            source = getattr(src.plan.recipe, "_source", None)
            paths += ([Path(source)] if source and Path(source).exists() else []) + input_paths(src.plan.inputs.values())
        elif hasattr(src, "adapter") and hasattr(src, "base"):  # an adapter applied to a base
            paths += [src.adapter.path] + input_paths([src.base])
    return paths


def write_support_files(plan: Plan, folder: Path) -> None:
    """config.json (patched to the output), generation config and tokenizer files, beside the tensors."""
    recipe = plan.recipe
    tokenizer_from = recipe.output.tokenizer_from or plan.config_source
    support = copy_support_files(plan.inputs[plan.config_source].root, folder, plan.inputs[tokenizer_from].root)
    config = patch_config(_read_json(folder / "config.json"), plan) if "config.json" in support else None
    config = write_tokenizer(recipe, plan.inputs, tokenizer_from, folder, config)
    if config is not None:
        write_json(folder / "config.json", config)


class StageOutput(PlanReader):
    """An earlier stage of a multi-stage config as an input: its tensors computed on demand from its plan
    (never written), its config and tokenizer files written to ``root``."""

    def __init__(self, plan: Plan, root: Path, ref: str):
        super().__init__(plan, ref)
        self.root, self.revision, self.files = root, None, []
        self._config = _read_json(root / "config.json") if (root / "config.json").is_file() else {}

    @property
    def config(self) -> dict:
        """The stage's written config.json (its layer count, dtype and vocabulary size patched)."""
        return self._config


def _run_stages(text: str, source: str, out, **options) -> RunResult:
    """A multi-stage mergekit config (mergekit-multi) as one stream: each earlier stage the output needs is
    planned, its small files (config, tokenizer) written to a temporary folder, and its tensors computed
    on demand where later stages read them. A LoRA applied to a stage's output needs that output on disk:
    then every stage is written to the temporary folder first, as mergekit-multi does."""
    import tempfile

    from surgery.loader import load_mergekit
    from surgery.mergekit.multi import load_stages

    start = time.perf_counter()
    lenient = options.pop("mergekit_lenient", False)
    stages = load_stages(text, source)
    on_disk = any(stage.applies_lora_to_stage() for stage in stages)
    out = Path(out)
    out = check_target(out, options.get("force", False), inputs=[Path(source)])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.stages-", dir=out.parent) as tmp:
        folders: dict[str, Path] = {}
        staged: dict[str, StageOutput] = {}  # folder -> the stage's output, in memory
        for i, stage in enumerate(stages):
            recipe = load_mergekit(stage.with_outputs(folders), source, stage.lines, text, lenient=lenient)
            opened = {n: staged[ref] for n, ref in recipe.inputs.items() if isinstance(ref, str) and ref in staged}
            inputs = open_inputs(recipe, convert_bin=options.get("convert_bin", False), opened=opened)
            if stage is stages[-1]:
                result = run(recipe, out, inputs=inputs, **options)
                break
            folder = Path(tmp) / f"stage{i}"
            if on_disk:
                run(recipe, folder, inputs=inputs, **options)
            else:
                if options.get("random_seed") is not None:
                    recipe.seed = options["random_seed"]
                folder.mkdir()
                plan = build_plan(recipe, inputs=inputs)
                write_support_files(plan, folder)
                staged[str(folder.resolve())] = StageOutput(plan, folder, f"{source} (stage {stage.name!r})")
            folders[stage.name] = folder.resolve()
    result.seconds = time.perf_counter() - start
    return result


def patch_config(config: dict, plan: Plan) -> dict:
    """Make config.json match the output: dtype, layer count and per-layer lists."""
    targets = [config] + [v for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]
    dtype = plan.recipe.output.config_dtype or plan.recipe.output.dtype
    n_out, n_src = len(plan.layer_map), plan.n_source_layers
    remap = plan.layer_map != list(range(n_src))
    per_layer = set(layout_data()["per_layer_config_keys"])
    for cfg in targets:
        if dtype:
            for key in ("torch_dtype", "dtype"):
                if key in cfg or (key == "dtype" and cfg is config and "torch_dtype" not in cfg):
                    cfg[key] = dtype
        if remap and plan.layout.num_layers_key in cfg and cfg[plan.layout.num_layers_key] == n_src:
            cfg[plan.layout.num_layers_key] = n_out
            for key, value in list(cfg.items()):
                if key in per_layer and isinstance(value, list) and len(value) == n_src:
                    cfg[key] = [value[j] for j in plan.layer_map]
    return config


def build_manifest(plan: Plan, hashes: dict, shards: list[str]) -> dict:
    from importlib.metadata import version

    from surgery.core import devices

    inputs = {}
    for name, ck in plan.inputs.items():
        inputs[name] = {"ref": ck.ref, "path": str(ck.root), "revision": ck.revision,
                        "sha256": hashes.get(name, {})}
    return {
        "tool": "surgery",
        "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "description": plan.recipe.description,
        "seed": plan.recipe.seed,
        # bytes do not depend on it (docs/reproducibility.md); recorded to rule it out when comparing runs
        "threads": devices.threads_used,  # None: nothing was computed (a copy-only plan does not import torch)
        "torch": version("torch"),
        "recipe": RECIPE_NAME,
        "inputs": inputs,
        "config_from": plan.config_source,
        "output": {"shards": shards, "num_tensors": len(plan.entries), "total_bytes": plan.total_bytes,
                   "dtype": plan.recipe.output.dtype or "as recipient",
                   "shard_size": plan.recipe.output.shard_size},  # the recipe's, or --shard-size
        "plan": plan.to_dict(),
    }


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())
