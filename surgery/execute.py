"""The streaming executor: Plan -> files on disk.

    result = run("recipe.yaml", "out/")         # what `surgery run` does
    result.output, result.seconds, result.total_bytes

Tensors are computed one at a time, in output order, and written as soon as they exist;
memory holds the output tensor and its inputs, never the model.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .card import write_model_card
from .checkpoint import TensorMeta, sha256_file
from .ops import Node, elementwise, evaluate, refs
from .plan import Plan, build_plan
from .recipe import Recipe, load_recipe, parse_size
from .writer import ShardedWriter, atomic_dir, check_target, copy_support_files, write_json

MANIFEST_NAME = "surgery_manifest.json"
RECIPE_NAME = "surgery_recipe.yaml"


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
        convert_bin: bool = False, random_seed: int | None = None) -> RunResult:
    """Validate, plan and execute a recipe, writing a checkpoint to ``out`` atomically.

    ``random_seed`` overrides the recipe's ``seed`` (used by random merge methods).
    """
    start = time.perf_counter()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if random_seed is not None:
        recipe.seed = random_seed
    out = Path(out)
    check_target(out.resolve(), force)
    plan = build_plan(recipe, convert_bin=convert_bin)
    with ThreadPoolExecutor(max_workers=1) as pool, atomic_dir(out, force=force) as tmp:
        # hashing the inputs runs beside the tensor stream, on the other core
        hashes = {name: {f.name: pool.submit(sha256_file, f) for f in ck.files} for name, ck in plan.inputs.items()}
        shards = execute(plan, tmp, quiet=quiet)
        tokenizer_from = recipe.output.tokenizer_from or plan.config_source
        support = copy_support_files(plan.inputs[plan.config_source].root, tmp, plan.inputs[tokenizer_from].root)
        if "config.json" in support:
            config = patch_config(_read_json(tmp / "config.json"), plan)
            write_json(tmp / "config.json", config)
        recipe_text = recipe.to_yaml()
        (tmp / RECIPE_NAME).write_text(recipe_text)
        write_model_card(tmp, plan, recipe_text, name=out.name)
        manifest = build_manifest(plan, {n: {f: h.result() for f, h in fs.items()} for n, fs in hashes.items()},
                                  shards)
        write_json(tmp / MANIFEST_NAME, manifest)
        files = sorted(p.name for p in tmp.iterdir())
    for ck in plan.inputs.values():
        ck.close()
    return RunResult(out.resolve(), plan, time.perf_counter() - start, files)


def iter_tensors(plan: Plan):
    """Yield ``(entry, tensor)`` for every output tensor, in output order, computed as `surgery run`
    computes it. The tensor may still be float32: cast it to ``torch_dtype(entry.dtype)`` (the writer
    does) to get the bytes `surgery run` writes. Memory holds one output tensor and its inputs."""
    inputs = plan.inputs

    def read(ref):
        return inputs[ref.input].get(ref.name)  # positioned reads: memory holds only tensors in use

    for e in plan.entries:
        yield e, (compute_in_blocks(e, inputs) if _in_blocks(e, inputs) else evaluate(e.node, read))


def execute(plan: Plan, folder: Path, *, quiet: bool = True) -> list[str]:
    """Stream every planned tensor into shards in ``folder``; return the shard file names."""
    from tqdm.auto import tqdm

    specs = [(e.name, TensorMeta(e.dtype, e.shape)) for e in plan.entries]
    max_bytes = parse_size(plan.recipe.output.shard_size)

    # Writing tensor i (dtype cast + disk) overlaps computing tensor i+1: at most two outputs in memory.
    with ShardedWriter(folder, specs, max_bytes) as writer, ThreadPoolExecutor(max_workers=1) as io, \
            tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="surgery run", disable=quiet,
                 leave=False) as bar:
        pending = None
        for e, tensor in iter_tensors(plan):
            if pending is not None:
                pending.result()
            pending = io.submit(writer.write, e.name, tensor)
            del tensor
            bar.update(e.nbytes)
        if pending is not None:
            pending.result()
        return list(writer.files)


BLOCK_BYTES = 32 << 20  # float32 bytes per row block when a large tensor is computed in blocks


def _in_blocks(e, inputs) -> bool:
    """Compute in row blocks: a large tensor whose tree is elementwise math over file-backed inputs."""
    return (isinstance(e.node, Node) and len(e.shape) >= 1 and e.shape[0] > 1
            and 4 * math.prod(e.shape) > BLOCK_BYTES and elementwise(e.node)
            and all(hasattr(inputs[r.input], "weight_map") for r in refs(e.node)))


def compute_in_blocks(e, inputs):
    """One output tensor, row block by row block: memory holds the output and one block of each input
    instead of whole float32 copies of every input (the same float32 steps per element, so the same bytes)."""
    import torch

    from .writer import torch_dtype

    out = torch.empty(e.shape, dtype=torch_dtype(e.dtype))
    row_floats = max(1, out[0].numel())
    step = max(1, BLOCK_BYTES // (4 * row_floats))
    for a in range(0, e.shape[0], step):
        b = min(e.shape[0], a + step)
        out[a:b] = evaluate(e.node, lambda ref: inputs[ref.input].get(ref.name, rows=(a, b)))
    return out


def patch_config(config: dict, plan: Plan) -> dict:
    """Make config.json match the output: dtype, layer count and per-layer lists."""
    from .layout import _data

    targets = [config] + [v for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]
    dtype = plan.recipe.output.dtype
    n_out, n_src = len(plan.layer_map), plan.n_source_layers
    remap = plan.layer_map != list(range(n_src))
    per_layer = set(_data()["per_layer_config_keys"])
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
        "recipe": RECIPE_NAME,
        "inputs": inputs,
        "config_from": plan.config_source,
        "output": {"shards": shards, "num_tensors": len(plan.entries), "total_bytes": plan.total_bytes,
                   "dtype": plan.recipe.output.dtype or "as recipient"},
        "plan": plan.to_dict(),
    }


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())
