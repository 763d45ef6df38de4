"""The streaming executor: Plan -> tensors, one at a time, in output order.

    for entry, tensor in iter_tensors(plan): ...     # in memory (surgery eval)
    shards = execute(plan, folder)                   # into safetensors shards (surgery run)

Tensors are computed one at a time and handed on as soon as they exist; memory holds the output
tensor and its inputs, never the model. A tensor the plan only copies (a plain ref to a checkpoint
tensor, same dtype) is never read: ``execute`` hands the writer its byte range, which the kernel
copies (``surgery.io.copy``), and weighted sums of stored tensors (swap transitions, arithmetic) and linear,
task-arithmetic and TIES merges are computed without torch (``core.host_math``: numpy and compiled kernels, the
same bytes), so such plans never import it.
"""

from __future__ import annotations

import importlib
import math
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from surgery.core import devices, host_math
from surgery.core.devices import compute_context, writer_threads
from surgery.core.finite import check_finite
from surgery.core.graph import BLOCK_BYTES, Node, Ref, elementwise, evaluate, refs, row_blocks
from surgery.core.plan import Plan
from surgery.io.checkpoint import Checkpoint
from surgery.io.safetensors import TensorMeta, torch_dtype
from surgery.io.writer import ShardedWriter


def iter_tensors(plan: Plan, *, allow_nonfinite: bool = False):
    """Yield ``(entry, tensor)`` for every output tensor, in output order, computed as `surgery run`
    computes it. The tensor may still be float32: cast it to ``torch_dtype(entry.dtype)`` (the writer
    does) to get the bytes `surgery run` writes. Memory holds one output tensor and its inputs.
    A tensor with NaN/Inf values is refused (SurgeryError naming it and its inputs) unless ``allow_nonfinite``."""
    for e in plan.entries:
        yield e, compute(e, plan.inputs, allow_nonfinite=allow_nonfinite)


def compute(e, inputs, *, allow_nonfinite: bool = False, leaves: list | None = None):
    """One output tensor of a plan entry (float32 or the stored dtype; the writer casts), checked finite.
    ``leaves``: the entry's input tensors already read (``_read_leaves``)."""
    if leaves is not None:
        it = iter(leaves)  # evaluate visits the leaves in refs() order
        tensor = evaluate(e.node, lambda ref: next(it))
    elif _in_blocks(e, inputs):
        tensor = compute_in_blocks(e, inputs)
    else:
        tensor = evaluate(e.node, lambda ref: inputs[ref.input].get(ref.name))  # positioned reads
    if not allow_nonfinite:
        check_finite(e, tensor, inputs)
    return tensor


def copy_source(e, inputs) -> tuple[Path, int, int] | None:
    """``(file, start, end)`` when the entry's bytes are an input tensor's stored bytes, else None."""
    node = e.node
    if not isinstance(node, Ref):
        return None
    ck = inputs[node.input]
    if not isinstance(ck, Checkpoint) or node.name not in ck.offsets or ck.meta[node.name].dtype != e.dtype:
        return None
    return (ck.weight_map[node.name], *ck.offsets[node.name])


def shard_specs(plan: Plan) -> tuple[list, int]:
    """What the writer lays out in shards: ``(name, TensorMeta)`` of every output tensor in plan order, and
    the maximum shard size. The layout (``io.writer.shard_layout``) is a function of these alone, so a
    serial run and every Ray task of a distributed one cut the same shards."""
    return [(e.name, TensorMeta(e.dtype, e.shape)) for e in plan.entries], plan.recipe.output.shard_bytes


def execute(plan: Plan, folder: Path, *, quiet: bool = True, allow_nonfinite: bool = False,
            device: str = "cpu", shards: list[int] | None = None) -> list[str]:
    """Stream every planned tensor into shards in ``folder``; return the shard file names written.

    ``device``: where merge operations compute ('cpu' or 'cuda', see ``core.devices.resolve_device``).
    Copied tensors are the inputs' bytes and are not checked for NaN/Inf; computed ones are.
    ``shards``: write only these shards (indices into the layout) and no index: a part of a distributed run
    (``core.distribute``); only the tensors of these shards are read and computed.
    """
    devices.threads_used = None  # set by compute_context when a tensor is computed
    specs, max_bytes = shard_specs(plan)
    with ShardedWriter(folder, specs, max_bytes, only=shards) as writer:
        wanted = {name for _, name, _ in writer.order}
        entries = [e for e in plan.entries if e.name in wanted]
        _stream(entries, plan.inputs, writer, quiet, allow_nonfinite, device)
    return writer.written


def _stream(entries: list, inputs: dict, writer: ShardedWriter, quiet: bool, allow_nonfinite: bool,
            device: str) -> None:
    # Writing (dtype cast + disk; copies by the kernel) runs on one I/O thread, in plan order, while this thread
    # computes the next tensors: copies queue without limit (they hold no memory), computed tensors up to
    # PENDING_BYTES (at least one). Reading the inputs of the next tensor computed with torch overlaps computing
    # this one.
    sources = [copy_source(e, inputs) for e in entries]
    kinds = ["copy" if src else _kind(e, inputs, device, allow_nonfinite) for e, src in zip(entries, sources)]
    torch_at = [i for i, k in enumerate(kinds) if k == "torch"]
    if "host" in kinds or torch_at:
        devices.keep_freed_memory()  # computed tensors allocate and free buffers of a few sizes, over and over
    if "host" in kinds:  # import numpy while the copies before the first computed tensor run
        threading.Thread(target=importlib.import_module, args=("numpy",), daemon=True).start()
    following = dict(zip(torch_at, torch_at[1:]))  # torch entry -> the next one
    with ThreadPoolExecutor(max_workers=1) as io, ThreadPoolExecutor(max_workers=1) as reader, ExitStack() as stack, \
            _progress(sum(e.nbytes for e in entries), quiet) as bar:
        pending, prefetched = _Pending(), {}
        for i, e in enumerate(entries):
            kind = kinds[i]
            if kind == "copy":
                job = (writer.copy, e.name, *sources[i])
            elif kind == "host":  # numpy and compiled kernels (core.host_math): the same bytes without torch
                job = (writer.write, e.name, host_math.compute(e, inputs))
            else:
                if devices.threads_used is None:  # torch: for the first tensor that needs it
                    stack.enter_context(compute_context(device))
                reads = prefetched.pop(i, None)
                nxt = following.get(i)
                if nxt is not None and _prefetchable(entries[nxt], inputs):
                    prefetched[nxt] = reader.submit(_read_leaves, entries[nxt], inputs)
                job = (_write, writer, e.name, compute(e, inputs, allow_nonfinite=allow_nonfinite,
                                                       leaves=reads.result() if reads else None))
            pending.add(io.submit(*job), e.nbytes if kind != "copy" else 0)
            del job
            bar.update(e.nbytes)
        pending.drain(0)


PENDING_BYTES = 256 << 20  # computed bytes that may wait for the writer


class _Pending:
    """The writer's queued jobs: futures with the bytes of the computed tensors they hold."""

    def __init__(self):
        self.jobs: deque = deque()
        self.nbytes = 0

    def add(self, future, nbytes: int) -> None:
        self.jobs.append((future, nbytes))
        self.nbytes += nbytes
        self.drain(PENDING_BYTES)

    def drain(self, limit: int) -> None:
        """Wait for jobs in order until at most ``limit`` computed bytes wait (one job at least may); a job's
        error is raised as soon as it is seen."""
        while self.jobs:
            future, nbytes = self.jobs[0]
            if not (future.done() or limit == 0 or (self.nbytes > limit and len(self.jobs) > 1)):
                return
            self.jobs.popleft()
            self.nbytes -= nbytes
            future.result()


def _progress(total: int, quiet: bool):
    """tqdm's byte bar, or (quiet) a stand-in that costs nothing: importing tqdm.auto pulls in asyncio."""
    if quiet:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="surgery run", leave=False)


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def _kind(e, inputs, device: str, allow_nonfinite: bool) -> str:
    """How a computed entry is computed: 'host' (numpy, ``core.host_math``) or 'torch'."""
    if device == "cpu" and not allow_nonfinite and host_math.supported(e, inputs):
        return "host"
    return "torch"


def _prefetchable(e, inputs) -> bool:
    """Read ahead whole tensors of checkpoint files (not those computed in row blocks, not virtual inputs)."""
    return not _in_blocks(e, inputs) and all(isinstance(inputs[r.input], Checkpoint) for r in refs(e.node))


def _read_leaves(e, inputs) -> list:
    """Every leaf tensor of an entry's tree, in ``refs`` order (a ref used twice is read twice: ops may
    modify their arguments)."""
    return [inputs[r.input].get(r.name) for r in refs(e.node)]


def _write(writer: ShardedWriter, name: str, tensor) -> None:
    writer_threads()  # the dtype cast on the writer thread uses the same count (no spinning idle workers)
    writer.write(name, tensor)


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
    for a, b in row_blocks(e.shape, BLOCK_BYTES):
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
