"""The streaming executor: Plan -> tensors, one at a time, in output order.

    for entry, tensor in iter_tensors(plan): ...     # in memory (surgery eval)
    shards = execute(plan, folder)                   # into safetensors shards (surgery run)

Tensors are computed one at a time and handed on as soon as they exist; memory holds the output
tensor and its inputs, never the model.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from surgery.core.finite import check_finite
from surgery.core.graph import Node, elementwise, evaluate, refs
from surgery.core.plan import Plan
from surgery.io.checkpoint import Checkpoint
from surgery.io.safetensors import TensorMeta, torch_dtype
from surgery.io.writer import ShardedWriter
from surgery.recipe.parsing import parse_size


def iter_tensors(plan: Plan, *, allow_nonfinite: bool = False):
    """Yield ``(entry, tensor)`` for every output tensor, in output order, computed as `surgery run`
    computes it. The tensor may still be float32: cast it to ``torch_dtype(entry.dtype)`` (the writer
    does) to get the bytes `surgery run` writes. Memory holds one output tensor and its inputs.
    A tensor with NaN/Inf values is refused (SurgeryError naming it and its inputs) unless ``allow_nonfinite``."""
    inputs = plan.inputs

    def read(ref):
        return inputs[ref.input].get(ref.name)  # positioned reads: memory holds only tensors in use

    for e in plan.entries:
        tensor = compute_in_blocks(e, inputs) if _in_blocks(e, inputs) else evaluate(e.node, read)
        if not allow_nonfinite:
            check_finite(e, tensor, inputs)
        yield e, tensor


def execute(plan: Plan, folder: Path, *, quiet: bool = True, allow_nonfinite: bool = False) -> list[str]:
    """Stream every planned tensor into shards in ``folder``; return the shard file names."""
    from tqdm.auto import tqdm

    specs = [(e.name, TensorMeta(e.dtype, e.shape)) for e in plan.entries]
    max_bytes = parse_size(plan.recipe.output.shard_size)

    # Writing tensor i (dtype cast + disk) overlaps computing tensor i+1: at most two outputs in memory.
    with ShardedWriter(folder, specs, max_bytes) as writer, ThreadPoolExecutor(max_workers=1) as io, \
            tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="surgery run", disable=quiet,
                 leave=False) as bar:
        pending = None
        for e, tensor in iter_tensors(plan, allow_nonfinite=allow_nonfinite):
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
            and all(isinstance(inputs[r.input], Checkpoint) for r in refs(e.node)))


def compute_in_blocks(e, inputs):
    """One output tensor, row block by row block: memory holds the output and one block of each input
    instead of whole float32 copies of every input (the same float32 steps per element, so the same bytes)."""
    import torch

    out = torch.empty(e.shape, dtype=torch_dtype(e.dtype))
    row_floats = max(1, out[0].numel())
    step = max(1, BLOCK_BYTES // (4 * row_floats))
    for a in range(0, e.shape[0], step):
        b = min(e.shape[0], a + step)
        out[a:b] = evaluate(e.node, lambda ref: inputs[ref.input].get(ref.name, rows=(a, b)))
    return out


class PlanReader:
    """A plan's result as a ``TensorSource``: each tensor computed on demand, nothing written."""

    def __init__(self, plan: Plan, ref: str = "<plan>"):
        self.plan, self.ref = plan, ref
        self.entries = {e.name: e for e in plan.entries}
        self.meta = {e.name: TensorMeta(e.dtype, e.shape) for e in plan.entries}

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get_float(self, name: str):
        inputs = self.plan.inputs
        return evaluate(self.entries[name].node, lambda r: inputs[r.input].get(r.name)).float()

    def get(self, name: str):
        return self.get_float(name).to(torch_dtype(self.meta[name].dtype))

    @property
    def config(self) -> dict:
        """The config the output would get from (before its layer count and dtype are patched)."""
        return self.plan.inputs[self.plan.config_source].config

    def close(self) -> None:
        for ck in self.plan.inputs.values():
            ck.close()
