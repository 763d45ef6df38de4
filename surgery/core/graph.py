"""Tensor operations: the nodes of a plan's per-tensor op trees.

A plan gives every output tensor a small tree whose leaves are ``Ref(input, tensor_name)``
and whose inner nodes are ``Node(op, args, params)``. Each op is registered in ``OPS`` with
three functions: its output shape, its computation, and a one-line description for
``surgery plan``. Math happens in float32; ``take`` passes bytes through untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from surgery.errors import SurgeryError


@dataclass(frozen=True)
class Ref:
    """One tensor of one input."""

    input: str
    name: str
    layer: int | None = None      # source layer index, shown when it differs from the output layer
    out_layer: int | None = None
    label: str | None = field(default=None, compare=False)  # shown instead of input (a hidden input's view)

    def describe(self) -> str:
        shown = self.label or self.input
        if self.layer is not None and self.layer != self.out_layer:
            return f"{shown}[L{self.layer}]"
        return shown


@dataclass
class Node:
    op: str
    args: list  # of Ref | Node
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return OPS[self.op].describe([a.describe() for a in self.args], self.params)


@dataclass(frozen=True)
class Op:
    shape: Callable[[list[tuple], dict], tuple]
    compute: Callable[[list, dict], Any]
    describe: Callable[[list[str], dict], str]
    raw: bool = False  # True: args arrive in their stored dtype, not as float32
    # optional: fold(acc, arg, i, params) combines args one at a time (acc is None for i=0), so memory
    # holds the result and one argument instead of every argument at once; used instead of compute
    fold: Callable[[Any, Any, int, dict], Any] | None = None
    # True when output element i depends only on element i of each argument, so the executor may compute
    # a large tensor in row blocks (bitwise the same: the float32 steps per element don't change)
    elementwise: bool = False
    # optional: host(params, stored_dtypes) -> a HostKernel computing this node on numpy arrays, bitwise equal to
    # ``compute``, or None where it cannot (then torch computes it); plans whose nodes all have one compute without
    # importing torch (core.host_math). ``stored_dtypes`` are the arguments' safetensors dtypes for raw ops
    # (their arguments are then checkpoint tensors), None for the others.
    host: Callable[[dict, list | None], "HostKernel | None"] | None = None


@dataclass(frozen=True)
class HostKernel:
    """A node computed without torch (``core.host_math``).

    ``run(arrays)``: float32 arrays (the evaluator's own copies, the exact stored values) -> a float32 array (for
    raw ops: values exact in the node's result dtype). ``blockwise``: whether it may run on row blocks.
    ``run_stored(read_raws, out_dtype, out)``: stored bytes in, stored bytes out (``read_raws()`` returns the
    arguments' bytes as uint8 arrays; ``out`` receives the output's) -> the count of non-finite values written,
    or None where this form does not apply (then ``run``). ``prepare(read, shape)``: a whole-tensor kernel's own
    passes over row blocks (``read(i, (a, b))``: the stored bytes of rows a:b of argument i), returning a kernel
    ``f(arrays, rows)`` for row blocks, or None (then ``run`` on the whole tensor): TIES's streamed top-k."""

    run: Callable[[list], Any]
    blockwise: bool = True
    run_stored: Callable[[Callable, str, Any], "int | None"] | None = None
    prepare: Callable[[Callable, tuple], "Callable | None"] | None = None


OPS: dict[str, Op] = {}


def register(name: str, op: Op) -> None:
    if name in OPS:
        raise ValueError(f"op {name!r} is already registered")
    OPS[name] = op


def refs(node) -> list[Ref]:
    """All leaves of a tree."""
    if isinstance(node, Ref):
        return [node]
    return [r for a in node.args for r in refs(a)]


def elementwise(node) -> bool:
    """True if every op in the tree is elementwise (see Op.elementwise)."""
    return isinstance(node, Ref) or (OPS[node.op].elementwise and all(elementwise(a) for a in node.args))


BLOCK_BYTES = 32 << 20  # float32 bytes per row block when a large elementwise tensor is computed in blocks


def row_blocks(shape: tuple, block_bytes: int):
    """``(a, b)`` row ranges along the first axis covering ``shape``, each about ``block_bytes`` of float32."""
    rows = shape[0] if shape else 1
    step = max(1, block_bytes // (4 * max(1, math.prod(shape[1:]))))
    for a in range(0, rows, step):
        yield a, min(rows, a + step)


def infer_shape(node, shape_of: Callable[[Ref], tuple]) -> tuple:
    if isinstance(node, Ref):
        return shape_of(node)
    return OPS[node.op].shape([infer_shape(a, shape_of) for a in node.args], node.params)


def evaluate(node, read: Callable[[Ref], Any]):
    """Compute a tree. ``read`` returns the stored tensor of a Ref."""
    if isinstance(node, Ref):
        return read(node)
    op = OPS[node.op]
    if op.fold is not None:
        acc = None
        for i, a in enumerate(node.args):
            t = evaluate(a, read)
            acc = op.fold(acc, t if op.raw else t.float(), i, node.params)
            del t
        return acc
    args = [evaluate(a, read) for a in node.args]
    if not op.raw:
        args = [a.float() for a in args]
    return op.compute(args, node.params)


# ---------------------------------------------------------------------------- take

def same_shapes(shapes: list[tuple], params: dict) -> tuple:
    first = shapes[0]
    for s in shapes[1:]:
        if s != first:
            raise SurgeryError(f"shapes {list(first)} and {list(s)} don't line up")
    return first


register("take", Op(shape=same_shapes, compute=lambda ts, p: ts[0], describe=lambda a, p: a[0], raw=True,
                    elementwise=True))


# ---------------------------------------------------------------------------- linear

# Weighted sums are rounded step by step in float32, out = t0*c0, then out += ti*ci (a product and a sum, each
# rounded): not torch's fused ``add_(t, alpha=c)``, whose vector and scalar paths round differently and which
# numpy cannot reproduce. The torch and numpy kernels below are bitwise equal (tests/core/test_host_math.py).

def _linear(tensors, params):
    acc = None
    for i, t in enumerate(tensors):
        acc = _linear_fold(acc, t, i, params)
    return acc


def _fmt_coeff(c: float) -> str:
    return f"{c:.4g}"


def _describe_linear(args: list[str], params) -> str:
    parts = []
    for i, (c, a) in enumerate(zip(params["coeffs"], args)):
        sign = "-" if c < 0 else "+"
        mag = abs(c)
        term = a if mag == 1 else f"{_fmt_coeff(mag)}·{a}"
        parts.append((("-" if sign == "-" else "") if i == 0 else f" {sign} ") + term)
    return "".join(parts)


def _linear_fold(acc, t, i, params):
    c = params["coeffs"][i]
    if acc is None:
        return t * c
    return acc.add_(t if c == 1.0 else t * c)


def _linear_numpy(arrays, params):
    import numpy as np

    out = None
    for c, a in zip(params["coeffs"], arrays):
        c = np.float32(c)
        if out is None:
            out = a * c
        elif c == 1:
            out += a
        else:
            a *= c  # the argument arrays are the evaluator's own float32 copies
            out += a
    return out


def _linear_host(params, stored) -> HostKernel:
    return HostKernel(lambda arrays: _linear_numpy(arrays, params))


register("linear", Op(shape=same_shapes, compute=_linear, describe=_describe_linear, fold=_linear_fold,
                      elementwise=True, host=_linear_host))


def linear(terms: list[tuple[float, Any]]):
    """A weighted sum node; a single term of weight 1 is just that ref."""
    terms = [(c, a) for c, a in terms if c != 0]
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]
    return Node("linear", [a for _, a in terms], {"coeffs": [float(c) for c, _ in terms]})


# ---------------------------------------------------------------------------- splice (rows/columns)

def _splice_shape(shapes: list[tuple], params: dict) -> tuple:
    first = same_shapes(shapes, params)
    axis, index = params["axis"], params["index"]
    if axis >= len(first):
        raise SurgeryError(f"splice axis {axis} is out of range for a tensor of shape {list(first)}")
    bad = [i for i in index if not 0 <= i < first[axis]]
    if bad:
        raise SurgeryError(f"index {bad[0]} is out of range: axis {axis} has size {first[axis]}")
    return first


def _splice(tensors, params):
    """A copy of the first tensor whose slices ``index`` along ``axis`` come from the second (or are zero)."""
    import torch

    out = tensors[0].clone()
    index = torch.tensor(params["index"], dtype=torch.long)
    if len(tensors) > 1:
        src = tensors[1] if tensors[1].dtype == out.dtype else tensors[1].to(out.dtype)
        out.index_copy_(params["axis"], index, src.index_select(params["axis"], index))
    else:
        out.index_fill_(params["axis"], index, 0)
    return out


def _describe_splice(args: list[str], params) -> str:
    unit, index = params.get("unit") or ("rows" if params["axis"] == 0 else "cols"), params["index"]
    what = f"{unit} {','.join(map(str, index))}" if len(index) <= 6 else f"{len(index)} {unit}"
    return f"{args[0]} with {what} from {args[1]}" if len(args) > 1 else f"{args[0]} with {what} zeroed"


# raw: the untouched entries keep their stored bytes; spliced slices are the donor's bytes when dtypes match
register("splice", Op(shape=_splice_shape, compute=_splice, describe=_describe_splice, raw=True))


def splice(recipient, donor, axis: int, index: list[int], unit: str | None = None):
    """Node: ``recipient`` with slices ``index`` along ``axis`` taken from ``donor`` (None: zeroed).
    ``unit``: what the slices are, for ``surgery plan`` (default: rows or cols)."""
    return Node("splice", [recipient] + ([donor] if donor is not None else []),
                {"axis": int(axis), "index": sorted({int(i) for i in index}), **({"unit": unit} if unit else {})})
