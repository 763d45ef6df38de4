"""Torch-free math: entries whose ops all have host kernels (``Op.host``: weighted sums; linear, task-arithmetic and
TIES merges, ``surgery.merge``), computed without importing torch.

    if host_math.supported(entry, plan.inputs):
        data = host_math.compute(entry, plan.inputs)   # the entry's stored bytes, as a numpy array

A layer swap's transition layers and recipe arithmetic are ``linear`` nodes over checkpoint tensors:
float32 products and sums, each rounded (``core.graph``). numpy does the same IEEE float32 steps, so the
bytes are the torch path's, bit for bit (tests/core/test_host_math.py), and a plan that only copies and blends
never pays for importing torch (~2 CPU-s, more than the whole swap of a 0.5 GB model). Conversions:
bfloat16 -> float32 is exact (the 16 bits become the high half); float32 -> bfloat16 rounds to nearest even
as torch does; float16 both ways is numpy's IEEE conversion, as torch's. NaN payloads are where numpy and
torch may differ, so runs that allow non-finite values take the torch path.

``--backend torch`` (``core.devices.backend``) turns this path off (for comparisons; the bytes are the same).

The tensor is computed in row blocks (``HOST_BLOCK_BYTES`` of float32 per input), so memory holds the output
and one block of each input; a whole-tensor kernel (TIES) first makes its own passes over row blocks
(``HostKernel.prepare``, ``merge.ties_stream``) where it has them.
"""

from __future__ import annotations

import os

from surgery.core import devices
from surgery.core.graph import OPS, HostKernel, Node, Ref, refs, row_blocks
from surgery.io.checkpoint import Checkpoint

HOST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "uint16"}  # safetensors dtype -> numpy storage
# float32 bytes per input and row block: numpy makes one pass per step, so blocks that stay in the cache
# (a few MB) are faster (task arithmetic: 0.40 s per 32.8M entries in 4 MB blocks, 0.74 s in 16 MB ones)
HOST_BLOCK_BYTES = 4 << 20


def supported(entry, inputs) -> bool:
    """True when every op of the entry's tree has a host kernel for these arguments and every tensor (inputs,
    output) is float32, float16 or bfloat16 in a checkpoint file."""
    if entry.dtype not in HOST_DTYPES or not devices.host_math_allowed():
        return False
    for r in refs(entry.node):
        ck = inputs[r.input]
        if not isinstance(ck, Checkpoint) or r.name not in ck.offsets or ck.meta[r.name].dtype not in HOST_DTYPES:
            return False
    return kernels(entry.node, lambda ref: _stored(inputs, ref)) is not None


def kernels(node, stored) -> dict | None:
    """Each node of the tree -> its HostKernel (by id), or None where one node has none. ``stored(ref)``: a
    checkpoint tensor's safetensors dtype (raw ops' kernels depend on it)."""
    found: dict = {}

    def visit(n) -> bool:
        if isinstance(n, Ref):
            return True
        op = OPS[n.op]
        if op.host is None:
            return False
        if op.raw:  # the kernel reads its arguments' stored dtypes: they must be checkpoint tensors
            if not all(isinstance(a, Ref) for a in n.args):
                return False
            kernel = op.host(n.params, [stored(a) for a in n.args])
        else:
            kernel = op.host(n.params, None) if all(visit(a) for a in n.args) else None
        found[id(n)] = kernel
        return kernel is not None

    return found if visit(node) else None


def _stored(inputs, ref: Ref) -> str:
    return inputs[ref.input].meta[ref.name].dtype


def compute(entry, inputs):
    """The entry's tensor in its stored dtype (a numpy array; bfloat16 as uint16 bit patterns), refused like
    the torch path's (``core.finite``) when it holds NaN/Inf or values past a float16 output's range.

    Row blocks are computed on ``host_threads()`` threads (numpy releases the GIL inside each step)."""
    import numpy as np

    from surgery.core import finite

    shape = entry.shape
    out = np.empty(shape, dtype=HOST_DTYPES[entry.dtype])
    flat = out.reshape(shape[0] if shape else 1, -1)

    node = entry.node
    found = kernels(node, lambda ref: _stored(inputs, ref))
    top: HostKernel | None = found.get(id(node)) if isinstance(node, Node) else None
    # a raw op's kernel returns values of its own result dtype (``out_dtype``, as plan.py reads it)
    exact = isinstance(node, Node) and OPS[node.op].raw and node.params.get("out_dtype") == entry.dtype
    prepared = _prepare(top, node, inputs, shape)

    def block(rows):
        a, b = rows

        def stored_bytes(ref):
            return read(inputs[ref.input], ref.name, rows if shape else None)

        if top is not None and top.run_stored is not None:  # stored bytes in and out (a compiled kernel)
            bad = top.run_stored(lambda: [stored_bytes(r) for r in node.args], entry.dtype, flat[a:b])
            if bad is not None:
                return bad, 0
        with np.errstate(all="ignore"):  # overflow is counted and refused below, as on the torch path
            if prepared is not None:
                values = prepared([to_float32(stored_bytes(r), _stored(inputs, r)) for r in node.args], rows)
            else:
                values = evaluate(node, lambda ref: to_float32(stored_bytes(ref), _stored(inputs, ref)), found)
            from_float32(values.reshape(b - a, -1), entry.dtype, flat[a:b], exact)
            return finite.count_nonfinite(values), finite.count_over_range(entry, values)

    blockwise = prepared is not None or all(k.blockwise for k in found.values())
    blocks = list(row_blocks(shape, HOST_BLOCK_BYTES)) if blockwise else [(0, flat.shape[0])]
    counts = [block(blocks[0])]  # the first block alone: it opens the input files
    if len(blocks) > 1:
        counts += _pool().map(block, blocks[1:]) if host_threads() > 1 else map(block, blocks[1:])
    nonfinite, over_range = (sum(c) for c in zip(*counts))
    if nonfinite:
        raise finite.nonfinite_error(entry, nonfinite, inputs)
    if over_range:
        raise finite.over_range_error(entry, over_range)
    return out


def _prepare(top, node, inputs, shape):
    """A whole-tensor kernel's passes over row blocks (``HostKernel.prepare``: TIES's streamed top-k), giving a
    kernel for row blocks; None where the kernel has none or it does not apply."""
    if top is None or top.prepare is None or top.blockwise or not shape:
        return None
    args = node.args
    return top.prepare(lambda i, rows: read(inputs[args[i].input], args[i].name, rows), shape)


_POOL = None


def host_threads() -> int:
    """Threads for the row blocks: --threads or SURGERY_THREADS when given, else the usable cores (at most
    4: the steps are memory-bound). numpy's threads do not spin while waiting, unlike torch's OpenMP ones
    (``core.devices``), so a busy machine costs them little."""
    from surgery.core.threads import usable_cores

    if devices._requested is not None or os.environ.get("SURGERY_THREADS"):
        return devices.executor_threads() or 1
    return min(4, usable_cores())


def _pool():
    global _POOL
    if _POOL is None or _POOL._max_workers != host_threads():
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=host_threads(), thread_name_prefix="surgery-host")
    return _POOL


def evaluate(node, read, found: dict):
    """A tree of host kernels (``found``: ``kernels(node, inputs)``) over float32 arrays (``read(ref)`` returns a
    fresh float32 array)."""
    if isinstance(node, Ref):
        return read(node)
    return found[id(node)].run([evaluate(a, read, found) for a in node.args])


def read(ck: Checkpoint, name: str, rows: tuple[int, int] | None):
    """The stored bytes of ``name`` (rows ``a:b`` of its first axis) as a uint8 numpy array."""
    import numpy as np

    start, end = ck.byte_range(name, rows)
    buf = np.empty(end - start, dtype=np.uint8)
    ck.read_into(name, memoryview(buf), start)
    return buf


def to_float32(raw, dtype: str):
    """Stored bytes -> a new float32 array (exact for all three dtypes)."""
    import numpy as np

    if dtype == "F32":
        return raw.view(np.float32)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    out = np.left_shift(raw.view(np.uint16), 16, dtype=np.uint32)  # bfloat16: the high half of a float32
    return out.view(np.float32)


def from_float32(x, dtype: str, out, exact: bool = False) -> None:
    """float32 -> the stored dtype into ``out``, rounded to nearest even (bfloat16 as uint16 bit patterns).
    ``exact``: x holds values of ``dtype`` already (a merge kernel's result), so bfloat16 is just the high half."""
    import numpy as np

    if dtype == "F32":
        out[...] = x
    elif dtype == "F16":
        out[...] = x.astype(np.float16)  # numpy's casts do not write into an existing array any faster
    elif exact:
        np.right_shift(x.view(np.uint32), 16, out=out, casting="unsafe")
    else:
        u = x.view(np.uint32)
        bias = u >> 16
        bias &= 1
        bias += 0x7FFF
        bias += u  # u + bias wraps only for NaN payloads, which this path never writes (see the module docstring)
        np.right_shift(bias, 16, out=out, casting="unsafe")
