"""mergekit's ``linear`` and ``task_arithmetic`` in numpy, bit for bit, so such merges never import torch.

``core.host_math`` runs these kernels on row blocks of float32 arrays (every step is elementwise); each
array holds the exact values of its input's stored dtype. They repeat mergekit's torch steps:

* linear (mergekit/merge_methods/linear.py): a float32 accumulator, ``result.addcmul_(x, weight)`` per
  input, ``result /= sum(weights)``, cast to the inputs' dtype. torch's addcmul is a FUSED multiply-add
  (one rounding of ``acc + x*w``). Where ``x*w`` is exact in float32 (a weight like 0.5 or 0.25 with a
  bfloat16 input: few significant bits, |w| <= 1) a float32 add is that fused step. Otherwise the step is
  computed in float64, where the product is exact; the one float64 rounding of the sum can only make
  the float32 rounding wrong when it lands exactly on a float32 midpoint (or in float32's subnormal
  range): those few entries get the exact residual (TwoSum) and are rounded to odd, which makes the
  final rounding correct.
* task arithmetic (generalized_task_arithmetic.py without sparsification or consensus): every step in
  the merge dtype, i.e. a float32 operation rounded to bfloat16/float16 (what torch's reduced-precision
  kernels do): ``d = x - base``, ``d *= weight`` (the weight rounded to the dtype), ``mixed = sum(d)``
  (a float32 sum from +0 in input order, rounded once), ``mixed /= sum(weights)`` when normalizing, ``*= lambda``,
  ``base + mixed``.

Where the order of torch's reductions is not left to right (more than 4 terms in a sum) or a case is
not covered (other dtypes, vocabulary merges), ``supports`` says no and the torch kernels run. tests/
test_merge_numpy.py compares these kernels with mergekit's own on inputs full of edge cases.
"""

from __future__ import annotations

import math
import os

METHODS = ("linear", "task_arithmetic")
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# significant bits and lowest set bit (log2) of the values of each dtype
PRECISION = {"BF16": (8, -133), "F16": (11, -24), "F32": (24, -149)}
MAX_TERMS = 4  # torch's float32 sums of up to 4 terms go left to right (checked in the tests); beyond, pairwise
SUB_BLOCK = 1 << 20  # entries per step: the scratch arrays stay in cache


def merge_dtype(params: dict, stored: list[str]) -> str | None:
    """The safetensors dtype the method computes and returns in, or None where these kernels don't apply."""
    if any(d not in PRECISION for d in stored):
        return None
    if params.get("dtype"):
        return DTYPES.get(params["dtype"])
    if params["method"] == "linear":
        return stored[0] if len(set(stored)) == 1 else None  # mixed dtypes: mergekit's own kernel
    if "F32" in stored or len(set(stored)) > 1:  # torch's promotion: float16 with bfloat16 gives float32
        return "F32"
    return stored[0]


def supports(params: dict, stored: list[str]) -> bool:
    """True when the kernels below compute this merge node exactly as mergekit does."""
    if params["method"] not in METHODS or params.get("vocab") is not None or merge_dtype(params, stored) is None:
        return False
    if os.environ.get("SURGERY_MERGEKIT_KERNELS") == "1":
        return False
    shared = params["shared"]
    terms = len(params["ids"]) - (params["base_index"] is not None)
    if params["method"] == "linear":
        return terms <= MAX_TERMS or not shared.get("normalize", True)
    return terms <= MAX_TERMS


def compute(arrays: list, params: dict, stored: list[str]):
    """The merged block as float32 values exactly representable in the merge dtype."""
    import numpy as np

    dtype = merge_dtype(params, stored)
    if params.get("dtype"):  # mergekit's `dtype`: the inputs are converted first
        arrays = [a if s == dtype else _round(a.copy(), dtype, np.empty(a.shape, np.uint32))
                  for a, s in zip(arrays, stored)]
    flat = [a.reshape(-1) for a in arrays]
    n = flat[0].size
    out = np.empty(n, dtype=np.float32)
    kernel = _linear if params["method"] == "linear" else _task_arithmetic
    step = kernel(params, dtype)
    scratch = np.empty(min(n, SUB_BLOCK), dtype=np.uint32)
    for start in range(0, n, SUB_BLOCK):
        end = min(n, start + SUB_BLOCK)
        out[start:end] = step([a[start:end] for a in flat], scratch[:end - start])
    return out.reshape(arrays[0].shape)


def _round(x, dtype: str, scratch):
    """float32 -> the nearest value of ``dtype`` (ties to even), in place; returns x."""
    import numpy as np

    if dtype == "BF16":
        u = x.view(np.uint32)
        np.right_shift(u, 16, out=scratch)
        scratch &= 1
        scratch += 0x7FFF
        u += scratch  # NaN payloads could carry into the exponent: non-finite results are refused anyway
        u &= 0xFFFF0000
    elif dtype == "F16":
        x[...] = x.astype(np.float16)
    return x


def _scalar(value: float, dtype: str) -> float:
    """A Python float as torch makes a tensor of ``dtype`` from it (via float32)."""
    import numpy as np

    x = np.array([value], dtype=np.float32)
    return float(_round(x, dtype, np.empty(1, np.uint32))[0])


def _fsum32(values: list[float]) -> float:
    """float32 sum, left to right."""
    import numpy as np

    total = np.float32(values[0])
    for v in values[1:]:
        total = np.float32(total + np.float32(v))
    return float(total)


def exact_product(c: float, dtype: str) -> bool:
    """True when x * c is exact in float32 for every value x of ``dtype`` (and cannot overflow)."""
    if c == 0:
        return True
    if abs(c) > 1 or not math.isfinite(c):
        return False
    mantissa, exponent = math.frexp(abs(c))  # c = m * 2**e, 0.5 <= m < 1
    bits, low = 0, exponent
    m = mantissa
    while m:  # significant bits of c and the exponent of its lowest set bit
        m *= 2
        low -= 1
        bits += 1
        m -= int(m)
    x_bits, x_low = PRECISION[dtype]
    return bits + x_bits <= 24 and low + x_low >= -149


def _linear(params: dict, dtype: str):
    import numpy as np

    weights = params["per_input"]
    coeffs = [float(np.float32(float(weights[i]["weight"]))) for i in params["ids"]]  # torch: float32 weights
    exact = [exact_product(c, dtype) for c in coeffs]
    denominator = np.float32(_fsum32(coeffs)) if params["shared"].get("normalize", True) else None

    def step(xs, scratch):
        acc = None
        for x, c, ex in zip(xs, coeffs, exact):
            if ex:  # x * c is exact: the fused step is one float32 add
                if acc is None:
                    acc = x * np.float32(c)
                    acc += np.float32(0)  # -0 + 0 = +0, as addcmul onto zeros
                else:
                    acc += x * np.float32(c)
            else:
                acc = _fma(x, c, acc)
        if denominator is not None:
            acc /= denominator
        return _round(acc, dtype, scratch)
    return step


MID_MASK, MIDPOINT = 0x1FFFFFFF, 0x10000000  # the low 29 bits of a float64 that float32 rounding drops
F32_NORMAL = 0x3810000000000000              # float64 bits of 2**-126


def _fma(x, c: float, acc):
    """float32 round(acc + x*c) with one rounding (acc None: zeros), via float64 (module docstring)."""
    import numpy as np

    p = x.astype(np.float64)
    p *= c
    s = p + acc if acc is not None else p + 0.0
    bits = s.view(np.int64)
    suspect = (bits & MID_MASK) == MIDPOINT
    magnitude = bits & 0x7FFFFFFFFFFFFFFF
    suspect |= (magnitude < F32_NORMAL) & (magnitude != 0)
    idx = np.flatnonzero(suspect)
    if idx.size:
        ss, pp = s[idx], p[idx]
        aa = acc[idx].astype(np.float64) if acc is not None else np.zeros(idx.size)
        bb = ss - pp
        err = (pp - (ss - bb)) + (aa - bb)  # TwoSum: s + err == p + acc exactly
        sb = ss.view(np.int64)
        fix = (err != 0) & ((sb & 1) == 0)  # inexact with an even last bit: round to odd
        sb[fix] += np.where(np.signbit(err) == np.signbit(ss), 1, -1)[fix]
        s[idx] = ss
    return s.astype(np.float32)


def _task_arithmetic(params: dict, dtype: str):
    import numpy as np

    shared = params["shared"]
    entries = [i for k, i in enumerate(params["ids"]) if k != params["base_index"]]
    weights = [_scalar(float(params["per_input"][i]["weight"]), dtype) for i in entries]
    divisor = None
    if shared.get("normalize", False):
        divisor = _scalar(_fsum32(weights), dtype)
        if abs(divisor) < _scalar(1e-8, dtype):
            divisor = 1.0
    lam = float(shared.get("lambda", 1.0))
    rest = [k for k in range(len(params["ids"])) if k != params["base_index"]]

    def step(xs, scratch):
        base = xs[params["base_index"]]
        if not rest:
            return base.copy()
        mixed = None
        for k, w in zip(rest, weights):
            d = _round(xs[k] - base, dtype, scratch)
            d *= np.float32(w)
            _round(d, dtype, scratch)
            if mixed is None:
                mixed = d
                mixed += np.float32(0)  # torch's sum starts from +0: a sum of -0s is +0
            else:
                mixed += d
        _round(mixed, dtype, scratch)
        if divisor is not None:
            mixed /= np.float32(divisor)
            _round(mixed, dtype, scratch)
        if lam != 1:
            mixed *= np.float32(lam)
            _round(mixed, dtype, scratch)
        mixed += base
        return _round(mixed, dtype, scratch)
    return step
