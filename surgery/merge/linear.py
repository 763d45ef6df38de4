"""linear: mergekit's weighted average (mergekit/merge_methods/linear.py).

mergekit: a float32 accumulator, ``result.addcmul_(x, weight)`` per input, ``result /= sum(weights)`` (unless
``normalize: false``), cast to the inputs' dtype. torch's addcmul is a FUSED multiply-add (one rounding of
``acc + x*w``).

Backends (``table``), all bitwise equal to mergekit:
* compiled (``_elementwise.c``, bfloat16 and float32): the same steps in one pass per block, with ``fmaf``; bfloat16
  inputs and output are read and written as stored (no float32 copies);
* numpy (bfloat16, float16, float32): numpy has no fused multiply-add, but where ``x*w`` is exact in float32 for every
  value x of the dtype (weights with few significant bits and |w| <= 1, like 0.5, 0.25 or 0.75 on bfloat16:
  ``numeric.exact_product``), a float32 add of the product is that fused step. Other weights go to torch (emulating
  the fused step in float64 was measured at 9.3 CPU-s for two 0.5 GB models against 5.7 for torch);
* torch (CPU and CUDA, any dtype): ``add_(x, alpha=w)`` is the same fused step as ``addcmul_``, on cache-sized
  chunks instead of streaming the whole tensor per input;
* mergekit's own kernel.
The host backends need the weights' sum to be left to right in float32 (at most ``MAX_TERMS`` inputs) when
normalizing.
"""

from __future__ import annotations

from surgery.merge import host
from surgery.merge.numeric import MAX_TERMS, exact_product, fsum32, round_to, scalar, terms
from surgery.merge.backend import Backend


def coeffs(params: dict) -> list[float]:
    """The weights as mergekit's linear uses them: float32."""
    return [scalar(float(params["per_input"][i]["weight"]), "F32") for i in params["ids"]]


def _denominator(params: dict, cs: list[float]):
    return fsum32(cs) if params["shared"].get("normalize", True) else None


def _compiled(params: dict, dtype: str, stored: list[str]):
    from surgery.merge import native

    kernels, cs = native.load("_elementwise"), coeffs(params)
    den = _denominator(params, cs)

    def step(xs, out, scratch=None):  # float32 arrays, or bfloat16 bit patterns (then it returns the NaN/Inf count)
        return kernels.linear(out, xs, cs, den, dtype == "BF16")
    return host.elementwise(params, dtype, stored, step, step)


def _numpy(params: dict, dtype: str, stored: list[str]):
    import numpy as np

    cs = [np.float32(c) for c in coeffs(params)]
    den = _denominator(params, [float(c) for c in cs])

    def step(xs, out, scratch):  # every x * c is exact here (the backend's condition)
        acc = xs[0] * cs[0]
        acc += np.float32(0)  # addcmul onto zeros: -0 + 0 = +0
        for x, c in zip(xs[1:], cs[1:]):
            acc += x * c  # the exact product, rounded once with the sum: torch's fused step
        if den is not None:
            acc /= np.float32(den)
        out[...] = round_to(acc, dtype, scratch)
    return host.elementwise(params, dtype, stored, step)


def torch_chunked(tensors: list, p: dict, parameters: dict, chunk: int = 1 << 20):
    """mergekit's kernel on cache-sized chunks: every step is elementwise, so chunking changes no bit."""
    import torch

    from surgery.merge.mergekit_kernel import run

    first = tensors[0]
    if not first.is_floating_point() or any(t.dtype != first.dtype for t in tensors):
        return run(tensors, p, parameters)
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor([float(parameters["weight"][i]) for i in p["ids"]], dtype=torch.float64).to(acc_dtype)
    denominator = weights.sum()
    cs = [float(w) for w in weights]  # exactly the float32 weights, as Python floats
    flat = [t.reshape(-1) for t in tensors]
    out = torch.empty(first.shape, dtype=first.dtype, device=first.device)
    out_flat, n = out.reshape(-1), first.numel()
    acc = torch.empty(min(chunk, n), dtype=acc_dtype, device=first.device)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        a = acc[: end - start]
        a.zero_()
        for x, c in zip(flat, cs):
            a.add_(x[start:end], alpha=c)
        if parameters.get("normalize", True):
            a.div_(denominator)
        out_flat[start:end] = a
    return out


def _sum_in_order(params: dict, dtype) -> bool:
    return terms(params) <= MAX_TERMS or not params["shared"].get("normalize", True)


def _exact_products(params: dict, dtype) -> bool:
    return _sum_in_order(params, dtype) and all(exact_product(c, dtype) for c in coeffs(params))


BACKENDS = (
    Backend("linear", "compiled", _compiled, dtypes=("BF16", "F32"), needs=("_elementwise",), when=_sum_in_order,
            note=f"normalizing: at most {MAX_TERMS} inputs"),
    Backend("linear", "numpy", _numpy, dtypes=("BF16", "F16", "F32"), when=_exact_products,
            note=f"every weight's products exact in float32; normalizing: at most {MAX_TERMS} inputs"),
    Backend("linear", "torch", torch_chunked, devices=("cpu", "cuda")),
)
