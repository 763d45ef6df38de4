"""ties: mergekit's TIES (generalized_task_arithmetic.py: magnitude sparsification, sign consensus by sum).

mergekit keeps, per model, the ``k = int(density * n)`` entries of ``|delta|`` that torch's unstable descending
argsort puts first (``sparsify.magnitude``); ``topk`` finds exactly those without the sort. Then ``d = r(delta *
weight)``, the sign elected by ``r(+0 + sum d)``, the agreeing deltas summed and divided by the sum of their weights
(a divisor of 0 is 1), ``lambda``, ``base + mixed`` (``r``: rounding to the merge dtype).

Backends (``table``):
* compiled (bfloat16, float32; needs both compiled modules): whole tensors; the models sparsify on parallel threads
  (the kernels release the GIL), then ``_elementwise.c``'s ``ties`` does the rest in one pass. Bitwise equal;
* torch: ``gta.gta_parallel`` with ``magnitude_exact`` (the same top-k). Bitwise equal;
* torch, ``kernel: fast`` (``surgery run --fast-kernels``): ``magnitude_select`` keeps the same number of entries by
  selection (``kthvalue``, or a histogram of 16-bit patterns) instead of a sort; every entry above or below the
  threshold is treated as mergekit treats it, but among entries EQUAL to the threshold the lowest indices are kept
  where mergekit keeps whichever its sort puts first (2.7% of output entries differ on SmolLM2-135M in bfloat16);
* mergekit's own kernel.
"""

from __future__ import annotations

from surgery.merge import gta
from surgery.merge.numeric import MAX_TERMS, round_to, scalar, terms
from surgery.merge.backend import Backend




def _compiled(params: dict, dtype: str, stored: list[str]):
    from surgery.core.graph import HostKernel
    from surgery.merge import host

    def run(arrays):
        import numpy as np

        xs = host.flat(host.converted(arrays, params, stored, dtype))
        out = np.empty(xs[0].size, dtype=np.float32)
        _merge(xs, out, params, dtype)
        return out.reshape(arrays[0].shape)
    def prepare(read, shape):  # huge tensors: the top-k streamed in row blocks (bounded memory, the same bytes)
        from surgery.merge import ties_stream

        return ties_stream.prepare(read, params, stored, shape)
    return HostKernel(run=run, blockwise=False, prepare=prepare)  # the top-k needs whole tensors (or streams)


def _merge(flat: list, out, params: dict, dtype: str) -> None:
    """Whole-tensor TIES on float32 arrays: each model's ``r(x - base)`` keeps its top-k entries (``topk``), the
    others become ±0 (``delta * mask``); the compiled ``ties`` kernel does the rest in one pass."""
    import numpy as np

    from surgery.merge import native
    from surgery.merge.topk import magnitude_keys_numpy, top_k_mask_numpy

    at = params["base_index"]
    base = flat[at]
    entries = [(k, i) for k, i in enumerate(params["ids"]) if k != at]
    weights = [scalar(float(params["per_input"][i]["weight"]), dtype) for _, i in entries]
    shared = params["shared"]
    if not entries:
        out[...] = base
        return

    def sparsify(entry):
        k, i = entry
        delta = round_to(flat[k] - base, dtype, np.empty(base.size, np.uint32))
        density = float(params["per_input"][i]["density"])
        if density >= 1:
            return delta
        if density <= 0 or delta.size == 0:
            return np.zeros_like(delta)
        keep = max(1, int(density * delta.size))
        keys = magnitude_keys_numpy(delta, dtype == "BF16")  # ordered like the magnitudes; None for NaN
        mask = None if keys is None else top_k_mask_numpy(keys, keep)
        if mask is None:  # NaN, or introsort's heapsort fallback: the real sort decides, as in mergekit
            mask = _argsort_mask(delta, keep)
        delta *= mask
        return delta

    deltas = list(gta.pool().map(sparsify, entries)) if len(entries) > 1 else [sparsify(entries[0])]
    native.load("_elementwise").ties(out, base, deltas, weights, bool(shared.get("normalize", True)),
                                     float(shared.get("lambda", 1.0)), dtype == "BF16")


def _argsort_mask(delta, keep: int):
    """What mergekit keeps: the first ``keep`` of torch's descending argsort of |delta|."""
    import numpy as np
    import torch

    mask = np.zeros(delta.size, dtype=bool)
    mask[torch.argsort(torch.from_numpy(np.abs(delta)), descending=True)[:keep].numpy()] = True
    return mask


def magnitude_exact(tensor, density: float, rescale_norm=None):
    """mergekit.sparsify.magnitude with the same kept entries, found without its full argsort (``topk``);
    mergekit's own function where that replay does not apply."""
    from mergekit.sparsify import magnitude, rescaled_masked_tensor

    from surgery.merge.topk import magnitude_keys, top_k_mask

    if density >= 1 or density <= 0 or tensor.numel() == 0 or tensor.device.type != "cpu":
        return magnitude(tensor, density, rescale_norm)
    k = max(1, int(density * tensor.numel()))
    keys = magnitude_keys(tensor)  # ordered like mergekit's |x|.float(); a fresh tensor, so ours to reorder
    keep = top_k_mask(keys, k, overwrite=True) if keys is not None else None
    if keep is None:
        return magnitude(tensor, density, rescale_norm)
    return rescaled_masked_tensor(tensor, keep.to(tensor.dtype).reshape_as(tensor), rescale_norm)


def magnitude_select(tensor, density: float, rescale_norm=None):
    """mergekit.sparsify.magnitude with an O(n) selection instead of a full argsort; threshold ties are broken
    by lowest index (mergekit: by its unstable sort)."""
    import torch
    from mergekit.sparsify import rescaled_masked_tensor

    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    n = tensor.numel()
    k = max(1, int(density * n))
    if tensor.dtype in (torch.bfloat16, torch.float16):
        # 16-bit floats without their sign bit order like their magnitudes, as integers: one
        # histogram over the 32768 bit patterns finds the threshold (no float copy, no sort).
        w = tensor.reshape(-1).view(torch.int16) & 0x7FFF
        counts = torch.bincount(w, minlength=32768)
        from_top = counts.flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, k))          # first pattern (from the top) reaching k
        threshold = 32767 - j
        above = int(from_top[j - 1]) if j > 0 else 0
    else:
        w = tensor.abs().reshape(-1)
        if w.device.type == "cpu":
            w = w.float()
        threshold = torch.kthvalue(w, n - k + 1).values
        above = None
    keep = w > threshold
    need = k - (int(keep.sum()) if above is None else above)
    if need > 0:
        keep[torch.nonzero(w == threshold).squeeze(1)[:need]] = True
    del w
    return rescaled_masked_tensor(tensor, keep.to(tensor.dtype).reshape_as(tensor), rescale_norm)


def _exact(tensors, p, parameters, **kw):
    return gta.gta_parallel(tensors, p, parameters, magnitude=magnitude_exact, **kw)


def _fast(tensors, p, parameters, **kw):
    return gta.gta_parallel(tensors, p, parameters, magnitude=magnitude_select, **kw)


def _host_ok(params: dict, dtype) -> bool:
    return (terms(params) <= MAX_TERMS and params.get("kernel", "exact") == "exact"
            and not params["shared"].get("rescale", False))


def _is_fast(params: dict, dtype) -> bool:
    return params.get("kernel") == "fast"


BACKENDS = (
    Backend("ties", "compiled", _compiled, dtypes=("BF16", "F32"), needs=("_elementwise", "_introsort"),
            when=_host_ok, note=f"at most {MAX_TERMS} models, kernel: exact, no rescale"),
    Backend("ties", "torch", _fast, exact="not bitwise: entries at the threshold may differ", devices=("cpu", "cuda"),
            when=_is_fast, note="kernel: fast"),
    Backend("ties", "torch", _exact, devices=("cpu", "cuda")),
)
