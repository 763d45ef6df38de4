"""task_arithmetic: mergekit's task arithmetic (generalized_task_arithmetic.py without sparsification or consensus).

mergekit computes every step in the merge dtype, i.e. a float32 operation rounded to bfloat16/float16 (what torch's
reduced-precision kernels do): ``d = x - base``, ``d *= weight`` (the weight rounded to the dtype), ``mixed =
sum(d)`` (a float32 sum from +0 in input order, rounded once), ``mixed /= sum(weights)`` when normalizing, ``*=
lambda``, ``base + mixed``.

Backends (``table``), all bitwise equal to mergekit:
* compiled (``_elementwise.c``, bfloat16 and float32): the same steps in one pass per block; bfloat16 read and
  written as stored;
* numpy (bfloat16, float16, float32): one pass over memory per step (~40);
* torch: ``gta.gta_parallel``, mergekit's steps on chunks;
* mergekit's own kernel.
The host backends need the sum over the models to go left to right (at most ``MAX_TERMS`` models).
"""

from __future__ import annotations

from surgery.merge import gta, host
from surgery.merge.numeric import MAX_TERMS, fsum32, round_to, scalar, terms
from surgery.merge.backend import Backend


def _setup(params: dict, dtype: str):
    """(base index, the other inputs' indices, their weights in the dtype, the divisor or None, lambda)."""
    at = params["base_index"]
    rest = [k for k in range(len(params["ids"])) if k != at]
    weights = [scalar(float(params["per_input"][params["ids"][k]]["weight"]), dtype) for k in rest]
    divisor = None
    if params["shared"].get("normalize", False):
        divisor = scalar(fsum32(weights), dtype)
        if abs(divisor) < scalar(1e-8, dtype):
            divisor = 1.0
    return at, rest, weights, divisor, float(params["shared"].get("lambda", 1.0))


def _compiled(params: dict, dtype: str, stored: list[str]):
    from surgery.merge import native

    kernels = native.load("_elementwise")
    at, rest, weights, divisor, lam = _setup(params, dtype)

    def step(xs, out, scratch=None):  # float32 arrays, or bfloat16 bit patterns (then it returns the NaN/Inf count)
        return kernels.task_arithmetic(out, xs[at], [xs[k] for k in rest], weights, divisor, lam, dtype == "BF16")
    return host.elementwise(params, dtype, stored, step, step)


def _numpy(params: dict, dtype: str, stored: list[str]):
    import numpy as np

    at, rest, weights, divisor, lam = _setup(params, dtype)

    def step(xs, out, scratch):
        base = xs[at]
        mixed = None
        for k, w in zip(rest, weights):
            d = round_to(xs[k] - base, dtype, scratch)
            d *= np.float32(w)
            round_to(d, dtype, scratch)
            if mixed is None:
                mixed = d
                mixed += np.float32(0)  # torch's sum starts from +0: a sum of -0s is +0
            else:
                mixed += d
        round_to(mixed, dtype, scratch)
        if divisor is not None:
            mixed /= np.float32(divisor)
            round_to(mixed, dtype, scratch)
        if lam != 1:
            mixed *= np.float32(lam)
            round_to(mixed, dtype, scratch)
        mixed += base
        out[...] = round_to(mixed, dtype, scratch)
    return host.elementwise(params, dtype, stored, step)


def _base_only(params: dict, dtype: str, stored: list[str]):
    """No model besides the base: the base, as mergekit returns it."""
    def step(xs, out, scratch):
        out[...] = xs[params["base_index"]]
    return host.elementwise(params, dtype, stored, step)


def _in_order(params: dict, dtype) -> bool:
    return 0 < terms(params) <= MAX_TERMS


def _no_models(params: dict, dtype) -> bool:
    return terms(params) == 0


BACKENDS = (
    Backend("task_arithmetic", "compiled", _compiled, dtypes=("BF16", "F32"), needs=("_elementwise",),
            when=_in_order, note=f"1 to {MAX_TERMS} models"),
    Backend("task_arithmetic", "numpy", _numpy, dtypes=("BF16", "F16", "F32"), when=_in_order,
            note=f"1 to {MAX_TERMS} models"),
    Backend("task_arithmetic", "numpy", _base_only, dtypes=("BF16", "F16", "F32"), when=_no_models,
            note="the base alone"),
    Backend("task_arithmetic", "torch", gta.gta_parallel, devices=("cpu", "cuda")),
)
