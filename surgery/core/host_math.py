"""Torch-free math: plans whose computed tensors are weighted sums of stored tensors, in numpy.

    if host_math.supported(entry, plan.inputs):
        data = host_math.compute(entry, plan.inputs)   # the entry's stored bytes, as a numpy array

A layer swap's transition layers and recipe arithmetic are ``linear`` nodes over checkpoint tensors:
float32 products and sums, each rounded (``core.graph``). numpy does the same IEEE float32 steps, so the
bytes are the torch path's, bit for bit (tests/test_host_math.py), and a plan that only copies and blends
never pays for importing torch (~2 CPU-s, more than the whole swap of a 0.5 GB model). Conversions:
bfloat16 -> float32 is exact (the 16 bits become the high half); float32 -> bfloat16 rounds to nearest even
as torch does; float16 both ways is numpy's IEEE conversion, as torch's. NaN payloads are where numpy and
torch may differ, so runs that allow non-finite values take the torch path.

``SURGERY_NUMPY=0`` in the environment turns this path off (for comparisons; the bytes are the same).

The tensor is computed in row blocks (``BLOCK_BYTES`` of float32 per input), so memory holds the output
and one block of each input.
"""

from __future__ import annotations

import os

from surgery.core.graph import BLOCK_BYTES, OPS, Node, Ref, refs, row_blocks
from surgery.io.checkpoint import Checkpoint

HOST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "uint16"}  # safetensors dtype -> numpy storage


def supported(entry, inputs) -> bool:
    """True when every op of the entry's tree has a numpy kernel and every tensor (inputs, output) is
    float32, float16 or bfloat16 in a checkpoint file."""
    if entry.dtype not in HOST_DTYPES or not _numpy_ops(entry.node) or os.environ.get("SURGERY_NUMPY") == "0":
        return False
    for r in refs(entry.node):
        ck = inputs[r.input]
        if not isinstance(ck, Checkpoint) or r.name not in ck.offsets or ck.meta[r.name].dtype not in HOST_DTYPES:
            return False
    return True


def _numpy_ops(node) -> bool:
    return isinstance(node, Ref) or (isinstance(node, Node) and OPS[node.op].numpy is not None
                                     and all(_numpy_ops(a) for a in node.args))


def compute(entry, inputs):
    """The entry's tensor in its stored dtype (a numpy array; bfloat16 as uint16 bit patterns), refused like
    the torch path's (``core.finite``) when it holds NaN/Inf or values past a float16 output's range."""
    import numpy as np

    from surgery.core import finite

    shape = entry.shape
    out = np.empty(shape, dtype=HOST_DTYPES[entry.dtype])
    flat = out.reshape(shape[0] if shape else 1, -1)
    nonfinite = over_range = 0
    with np.errstate(all="ignore"):  # overflow is counted and refused below, as on the torch path
        for a, b in row_blocks(shape, BLOCK_BYTES):
            rows = (a, b) if shape else None
            block = evaluate(entry.node, lambda ref: to_float32(read(inputs[ref.input], ref.name, rows),
                                                                inputs[ref.input].meta[ref.name].dtype))
            nonfinite += finite.count_nonfinite(block)
            over_range += finite.count_over_range(entry, block)
            flat[a:b] = from_float32(block, entry.dtype).reshape(b - a, -1)
    if nonfinite:
        raise finite.nonfinite_error(entry, nonfinite, inputs)
    if over_range:
        raise finite.over_range_error(entry, over_range)
    return out


def evaluate(node, read):
    """A tree of numpy-capable ops over float32 arrays (``read(ref)`` returns a fresh float32 array)."""
    if isinstance(node, Ref):
        return read(node)
    return OPS[node.op].numpy([evaluate(a, read) for a in node.args], node.params)


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


def from_float32(x, dtype: str):
    """float32 -> the stored dtype, rounded to nearest even (bfloat16 as uint16 bit patterns)."""
    import numpy as np

    if dtype == "F32":
        return x
    if dtype == "F16":
        return x.astype(np.float16)
    u = x.view(np.uint32)
    bias = u >> 16
    bias &= 1
    bias += 0x7FFF
    bias += u  # u + bias wraps only for NaN payloads, which this path never writes (see the module docstring)
    bias >>= 16
    return bias.astype(np.uint16)
