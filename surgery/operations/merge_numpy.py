"""mergekit's ``linear``, ``task_arithmetic`` and ``ties`` without torch, bit for bit, so such merges never import
torch or mergekit.

``core.host_math`` runs these kernels on row blocks of float32 arrays (every step is elementwise); each
array holds the exact values of its input's stored dtype. They repeat mergekit's torch steps:

* linear (mergekit/merge_methods/linear.py): a float32 accumulator, ``result.addcmul_(x, weight)`` per
  input, ``result /= sum(weights)``, cast to the inputs' dtype. torch's addcmul is a FUSED multiply-add
  (one rounding of ``acc + x*w``), which numpy does not have. Where ``x*w`` is exact in float32 for every
  value x of the dtype (weights with few significant bits and |w| <= 1, like 0.5, 0.25 or 0.75 on bfloat16
  inputs: ``exact_product``), a float32 add of the product is that fused step. The compiled kernel
  (``_elementwise.c``) has ``fmaf`` and takes any weight; without it, other weights stay on torch
  (emulating the fused step in float64, with a fix for sums that land on a float32 midpoint, was measured
  at 9.3 CPU-s for two 0.5 GB models against 5.7 for torch, import included).
* task arithmetic (generalized_task_arithmetic.py without sparsification or consensus): every step in
  the merge dtype, i.e. a float32 operation rounded to bfloat16/float16 (what torch's reduced-precision
  kernels do): ``d = x - base``, ``d *= weight`` (the weight rounded to the dtype), ``mixed = sum(d)``
  (a float32 sum from +0 in input order, rounded once), ``mixed /= sum(weights)`` when normalizing, ``*= lambda``,
  ``base + mixed``.

* ties (the same file, magnitude sparsification and sign consensus by sum), on whole tensors: each model's
  ``r(x - base)`` keeps the entries mergekit's unstable argsort puts first (``introsort``'s exact replay,
  compiled), the others become ±0; then ``d = r(delta * weight)``, the sign elected by ``r(+0 + sum d)``,
  the agreeing deltas summed and divided by the sum of their weights (a divisor of 0 is 1), ``lambda``,
  ``base + mixed``. Only with the compiled kernels (else mergekit's path with surgery's drivers,
  ``merge_kernels.gta_parallel``).

For bfloat16 and float32 merges the same steps run in one pass per block in C (``_elementwise.c``, built by
``pip install``; ``native``), numpy making one pass over memory per step otherwise (~40 for task arithmetic).
Where the order of torch's reductions is not left to right (more than 4 terms in a sum) or a case is
not covered (other dtypes, vocabulary merges), ``supports`` says no and the torch kernels run. tests/
test_merge_numpy.py compares both implementations with mergekit's own kernels on inputs full of edge cases.
"""

from __future__ import annotations

import math
import os

METHODS = ("linear", "task_arithmetic", "ties")
ELEMENTWISE = ("linear", "task_arithmetic")  # TIES sparsifies whole tensors first
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# significant bits and lowest set bit (log2) of the values of each dtype
PRECISION = {"BF16": (8, -133), "F16": (11, -24), "F32": (24, -149)}
MAX_TERMS = 4  # torch's float32 sums of up to 4 terms go left to right (checked in the tests); beyond, pairwise


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
    dtype = merge_dtype(params, stored) if params["method"] in METHODS else None
    if dtype is None or params.get("vocab") is not None or os.environ.get("SURGERY_MERGEKIT_KERNELS") == "1":
        return False
    shared = params["shared"]
    terms = len(params["ids"]) - (params["base_index"] is not None)
    if params["method"] == "ties":  # the compiled kernels only: exact top-k and the sign election
        return (terms <= MAX_TERMS and native(dtype) is not None and params.get("kernel", "exact") == "exact"
                and not shared.get("rescale", False) and _top_k() is not None)
    if params["method"] == "linear":
        return (terms <= MAX_TERMS or not shared.get("normalize", True)) and \
            (native(dtype) is not None or all(exact_product(c, dtype) for c in _linear_coeffs(params)))
    return terms <= MAX_TERMS


def native(dtype: str):
    """The compiled kernels (``_elementwise.c``: the same steps in one pass, with a real fused multiply-add) for
    bfloat16 and float32 merges, or None: not built, another dtype, or ``SURGERY_NATIVE=0``."""
    from surgery.operations import native as compiled

    return compiled.load("_elementwise") if dtype in ("BF16", "F32") else None


def _linear_coeffs(params: dict) -> list[float]:
    """The weights as mergekit's linear uses them: float32."""
    return [_scalar(float(params["per_input"][i]["weight"]), "F32") for i in params["ids"]]


def _top_k():
    """introsort.top_k_mask_numpy when its compiled kernel is built (TIES's exact top-k), else None."""
    from surgery.operations import introsort

    return introsort.top_k_mask_numpy if introsort._native() is not None else None


def elementwise(params: dict) -> bool:
    """Whether the node's kernel works on row blocks (TIES needs whole tensors)."""
    return params["method"] in ELEMENTWISE


def compute(arrays: list, params: dict, stored: list[str]):
    """The merged block as float32 values exactly representable in the merge dtype."""
    import numpy as np

    dtype = merge_dtype(params, stored)
    if params.get("dtype"):  # mergekit's `dtype`: the inputs are converted first
        arrays = [a if s == dtype else _round(a.copy(), dtype, np.empty(a.shape, np.uint32))
                  for a, s in zip(arrays, stored)]
    flat = [np.ascontiguousarray(a).reshape(-1) for a in arrays]
    n = flat[0].size
    out = np.empty(n, dtype=np.float32)
    if params["method"] == "ties":
        _ties(flat, out, params, dtype)
        return out.reshape(arrays[0].shape)
    kernel = _linear if params["method"] == "linear" else _task_arithmetic
    step = kernel(params, dtype)
    step(flat, out, np.empty(n, dtype=np.uint32))  # host_math's row blocks already keep the arrays cache-sized
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

    with np.errstate(over="ignore"):  # past float32's range: ±inf, as torch makes it
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
    """True when x * c is exact in float32 for every value x of ``dtype`` (and cannot overflow): the product
    of the significands fits in 24 bits and its lowest bit is not below float32's smallest subnormal."""
    if c == 0:
        return True
    if abs(c) > 1 or not math.isfinite(c):
        return False
    num, den = abs(c).as_integer_ratio()  # c = num / den, den a power of two
    low = (num & -num).bit_length() - 1   # trailing zeros of num
    odd, low = num >> low, low - (den.bit_length() - 1)  # c = odd * 2**low
    x_bits, x_low = PRECISION[dtype]
    return (((1 << x_bits) - 1) * odd).bit_length() <= 24 and low + x_low >= -149


def compute_stored(read_raws, params: dict, stored: list[str], out_dtype: str, out):
    """bfloat16 in, bfloat16 out, through the compiled kernels (no float32 copies of the inputs or the output):
    fills ``out`` (uint16 bit patterns) and returns its count of non-finite values; None where this does not apply
    (then ``compute`` runs on float32 arrays). ``read_raws()``: the inputs' stored bytes."""
    base_only = params["method"] == "task_arithmetic" and len(stored) == 1  # (its kernel needs a model)
    if (params["method"] not in ELEMENTWISE or out_dtype != "BF16" or set(stored) != {"BF16"} or base_only
            or merge_dtype(params, stored) != "BF16" or len(stored) > IO_MAX or native("BF16") is None):
        return None
    import numpy as np

    step = (_linear if params["method"] == "linear" else _task_arithmetic)(params, "BF16")  # the compiled kernel's
    return step([r.view(np.uint16) for r in read_raws()], out.reshape(-1), None)


IO_MAX = 8  # inputs of the compiled kernels' bfloat16 form


def _linear(params: dict, dtype: str):
    """A step(xs, out, scratch) computing the merge of float32 arrays (the compiled kernel's step also takes
    uint16 bfloat16 bit patterns and returns their non-finite count)."""
    import numpy as np

    coeffs = [np.float32(c) for c in _linear_coeffs(params)]
    denominator = np.float32(_fsum32(coeffs)) if params["shared"].get("normalize", True) else None
    kernels = native(dtype)
    if kernels is not None:
        def native_step(xs, out, scratch):
            return kernels.linear(out, xs, [float(c) for c in coeffs],
                                  None if denominator is None else float(denominator), dtype == "BF16")
        return native_step

    def step(xs, out, scratch):  # every x * c is exact here (``supports``)
        acc = xs[0] * coeffs[0]
        acc += np.float32(0)  # addcmul onto zeros: -0 + 0 = +0
        for x, c in zip(xs[1:], coeffs[1:]):
            acc += x * c  # the exact product, rounded once with the sum: torch's fused step
        if denominator is not None:
            acc /= denominator
        out[...] = _round(acc, dtype, scratch)
    return step


def _task_arithmetic(params: dict, dtype: str):
    """A step like ``_linear``'s: every step in the merge dtype (the module's docstring)."""
    import numpy as np

    shared = params["shared"]
    at = params["base_index"]
    rest = [k for k in range(len(params["ids"])) if k != at]
    weights = [_scalar(float(params["per_input"][params["ids"][k]]["weight"]), dtype) for k in rest]
    divisor = None
    if shared.get("normalize", False):
        divisor = _scalar(_fsum32(weights), dtype)
        if abs(divisor) < _scalar(1e-8, dtype):
            divisor = 1.0
    lam = float(shared.get("lambda", 1.0))
    kernels = native(dtype)
    if kernels is not None and rest:
        def native_step(xs, out, scratch):
            return kernels.task_arithmetic(out, xs[at], [xs[k] for k in rest], weights, divisor, lam, dtype == "BF16")
        return native_step

    def step(xs, out, scratch):
        base = xs[at]
        if not rest:
            out[...] = base
            return
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
        out[...] = _round(mixed, dtype, scratch)
    return step


def _ties(flat: list, out, params: dict, dtype: str) -> None:
    """mergekit's TIES (generalized_task_arithmetic.py, magnitude sparsification, sign consensus by sum) on whole
    tensors: each model's delta ``r(x - base)`` keeps the entries mergekit's argsort puts first (the exact top-k
    replay, ``introsort``), the others become ±0 (``delta * mask``); the models sparsify on parallel threads
    (the kernels release the GIL); the compiled ``ties`` kernel does the rest in one pass."""
    import numpy as np

    from surgery.operations.introsort import magnitude_keys_numpy
    from surgery.operations.merge_kernels import _pool

    at = params["base_index"]
    base = flat[at]
    entries = [(k, i) for k, i in enumerate(params["ids"]) if k != at]
    if not entries:
        out[...] = base
        return
    weights = [_scalar(float(params["per_input"][i]["weight"]), dtype) for _, i in entries]
    shared = params["shared"]

    def sparsify(entry):
        k, i = entry
        delta = _round(flat[k] - base, dtype, np.empty(base.size, np.uint32))
        density = float(params["per_input"][i]["density"])
        if density >= 1:
            return delta
        if density <= 0 or delta.size == 0:
            return np.zeros_like(delta)
        keep = max(1, int(density * delta.size))
        keys = magnitude_keys_numpy(delta, dtype == "BF16")  # ordered like the magnitudes; None for NaN
        mask = None if keys is None else _top_k()(keys, keep)
        if mask is None:  # NaN, or introsort's heapsort fallback: the real sort decides, as in mergekit
            mask = _argsort_mask(delta, keep)
        delta *= mask
        return delta

    deltas = list(_pool().map(sparsify, entries)) if len(entries) > 1 else [sparsify(entries[0])]
    native(dtype).ties(out, base, deltas, weights, bool(shared.get("normalize", True)),
                       float(shared.get("lambda", 1.0)), dtype == "BF16")


def _argsort_mask(delta, keep: int):
    """What mergekit keeps: the first ``keep`` of torch's descending argsort of |delta|."""
    import numpy as np
    import torch

    mask = np.zeros(delta.size, dtype=bool)
    mask[torch.argsort(torch.from_numpy(np.abs(delta)), descending=True)[:keep].numpy()] = True
    return mask
