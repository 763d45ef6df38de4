"""float32 arithmetic the way torch does it in a merge dtype, for the host backends (numpy and compiled).

Each array holds the exact values of its input's stored dtype as float32; a step in bfloat16 or float16 is a
float32 step rounded to that dtype (what torch's reduced-precision CPU kernels do), ties to even.
"""

from __future__ import annotations

import math

DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# significant bits and lowest set bit (log2) of the values of each dtype
PRECISION = {"BF16": (8, -133), "F16": (11, -24), "F32": (24, -149)}
MAX_TERMS = 4  # torch's float32 sums of up to 4 terms go left to right (checked in the tests); beyond, pairwise


def merge_dtype(params: dict, stored: list[str]) -> str | None:
    """The safetensors dtype mergekit's linear, task arithmetic or TIES computes and returns in for these stored
    dtypes, or None where the host backends don't apply (other dtypes; linear over mixed dtypes)."""
    if any(d not in PRECISION for d in stored):
        return None
    if params.get("dtype"):
        return DTYPES.get(params["dtype"])
    if params["method"] == "linear":
        return stored[0] if len(set(stored)) == 1 else None  # mixed dtypes: mergekit's own kernel
    if "F32" in stored or len(set(stored)) > 1:  # torch's promotion: float16 with bfloat16 gives float32
        return "F32"
    return stored[0]


def round_to(x, dtype: str, scratch):
    """float32 -> the nearest value of ``dtype`` (ties to even), in place; returns x. ``scratch``: a uint32 array
    of x's size."""
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


def scalar(value: float, dtype: str) -> float:
    """A Python float as torch makes a tensor of ``dtype`` from it (via float32)."""
    import numpy as np

    with np.errstate(over="ignore"):  # past float32's range: ±inf, as torch makes it
        x = np.array([value], dtype=np.float32)
    return float(round_to(x, dtype, np.empty(1, np.uint32))[0])


def fsum32(values: list[float]) -> float:
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


def terms(params: dict) -> int:
    """The merged models, the base not counted."""
    return len(params["ids"]) - (params["base_index"] is not None)
