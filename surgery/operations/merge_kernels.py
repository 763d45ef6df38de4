"""Faster, exact drivers for some mergekit methods.

mergekit's task-arithmetic family (task_arithmetic, ties, breadcrumbs, breadcrumbs_ties)
sparsifies each model's delta one after the other; for TIES that is a full argsort per model
and tensor, which is most of the merge time. ``gta_parallel`` runs the same steps with
mergekit's own functions (``sparsify``, ``get_mask``) in the same order, but sparsifies the
models' deltas concurrently, one thread per model (torch releases the GIL). The arithmetic is
unchanged, so results are bitwise equal to mergekit's (tests/test_mergekit_parity.py checks
every method through this path). TIES's magnitude sparsification (``magnitude_exact``) finds the
entries mergekit's argsort keeps without the full sort (``surgery.operations.introsort``). Random
sparsification (DARE, DELLA) is left to mergekit: its draws depend on the order of calls.

``kernel: fast`` (or ``surgery run --fast-kernels``) also replaces TIES's argsort with a
selection (``kthvalue``): the same number of entries is kept, and every entry whose magnitude
is above or below the density threshold is treated exactly as mergekit does. Entries whose
magnitude EQUALS the threshold can differ: mergekit keeps whichever an unstable sort puts
first (implementation-defined), the fast kernel keeps the lowest indices. In bfloat16 such
ties are common (2.7% of output entries on SmolLM2-135M, docs/mergekit.md), so this kernel is opt-in.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

_POOL: ThreadPoolExecutor | None = None
PARALLEL = ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties")


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="surgery-merge")
    return _POOL


def fast_kernel(method: str, parameters: dict):
    """A drop-in for merge_tensors(method) on these parameters, or None to use mergekit's.

    SURGERY_MERGEKIT_KERNELS=1 in the environment turns these drivers off (for comparisons).
    """
    if os.environ.get("SURGERY_MERGEKIT_KERNELS") == "1":
        return None
    if method == "linear":
        return linear_chunked
    return gta_parallel if method in PARALLEL else None


def linear_chunked(method_name: str, tensors: list, ids: list, base_index, parameters: dict, fast: bool = False):
    """mergekit's linear kernel (linear.py), the same operations on cache-sized chunks.

    mergekit: result = zeros(float32); result.addcmul_(tensor, weight) per input; result /= sum
    of weights; cast back. ``add_(x, alpha=w)`` is the same fused multiply-add as ``addcmul_``
    with a broadcast weight, and every step is elementwise, so chunking changes no bit; it only
    keeps the float32 accumulator in cache instead of streaming the whole tensor per input.
    """
    import torch
    from mergekit.merge_methods.api import merge_tensors

    first = tensors[0]
    if not first.is_floating_point() or any(t.dtype != first.dtype for t in tensors):
        return merge_tensors(tensors, "linear", parameters=parameters, ids=ids)
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weight = parameters["weight"]
    weights = torch.tensor([float(weight[i]) for i in ids], dtype=torch.float64).to(acc_dtype)
    normalize = parameters.get("normalize", True)
    denominator = weights.sum()
    coeffs = [float(w) for w in weights]  # exactly the float32 weights, as Python floats
    flat = [t.reshape(-1) for t in tensors]
    out = torch.empty(first.shape, dtype=first.dtype, device=first.device)
    out_flat = out.reshape(-1)
    n = first.numel()
    chunk = 1 << 20
    acc = torch.empty(min(chunk, n), dtype=acc_dtype, device=first.device)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        a = acc[: end - start]
        a.zero_()
        for x, c in zip(flat, coeffs):
            a.add_(x[start:end], alpha=c)
        if normalize:
            a.div_(denominator)
        out_flat[start:end] = a
    return out


def magnitude_select(tensor, density: float, rescale_norm=None):
    """mergekit.sparsify.magnitude with an O(n) selection instead of a full argsort.

    Threshold ties are broken by lowest index (mergekit: by its unstable sort).
    """
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


def magnitude_exact(tensor, density: float, rescale_norm=None):
    """mergekit.sparsify.magnitude with the same kept entries, found without its full argsort
    (``surgery.operations.introsort``); mergekit's own function where that replay does not apply."""
    from mergekit.sparsify import magnitude, rescaled_masked_tensor

    from surgery.operations.introsort import magnitude_keys, top_k_mask

    if density >= 1 or density <= 0 or tensor.numel() == 0 or tensor.device.type != "cpu":
        return magnitude(tensor, density, rescale_norm)
    k = max(1, int(density * tensor.numel()))
    keys = magnitude_keys(tensor)  # ordered like mergekit's |x|.float(); a fresh tensor, so ours to reorder
    keep = top_k_mask(keys, k, overwrite=True) if keys is not None else None
    if keep is None:
        return magnitude(tensor, density, rescale_norm)
    return rescaled_masked_tensor(tensor, keep.to(tensor.dtype).reshape_as(tensor), rescale_norm)


def gta_parallel(method_name: str, tensors: list, ids: list, base_index: int | None, parameters: dict,
                 fast: bool = False, chunk: int = 1 << 22):
    """GeneralizedTaskArithmeticMerge.merge_group, with the per-model sparsification in parallel.

    ``fast``: TIES-style magnitude sparsification by selection instead of argsort (see above).
    """
    import torch
    from mergekit import merge_methods
    from mergekit.merge_methods.dtype import promoted_dtype  # noqa: F401 - same promotion as mergekit
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

    method = merge_methods.get(method_name)
    spec = method.spec
    for p in spec.parameters:  # defaults and type checks, as mergekit's binding does
        if p.name not in parameters:
            parameters[p.name] = p.default if p.scope.value == "shared" else {i: p.default for i in ids}
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    tensors = [t.to(dtype) for t in tensors]

    base = tensors[base_index]
    entries = [(i, t) for k, (i, t) in enumerate(zip(ids, tensors)) if k != base_index]
    if not entries:
        return base

    def delta_of(entry):
        i, t = entry
        delta = t - base
        if method.sparsification_method == SparsificationMethod.magnitude:
            delta = (magnitude_select if fast else magnitude_exact)(
                delta, parameters["density"][i], RescaleNorm.l1 if parameters["rescale"] else None)
        elif method.sparsification_method:
            delta = sparsify(delta, density=parameters["density"][i], method=method.sparsification_method,
                             rescale_norm=RescaleNorm.l1 if parameters["rescale"] else None,
                             **{key: parameters[key][i] for key in ("gamma", "epsilon") if key in parameters
                                and any(p.name == key for p in spec.parameters)})
        return delta

    if method.sparsification_method:
        if len(entries) > 1:
            deltas = list(_pool().map(delta_of, entries))
        else:
            deltas = [delta_of(e) for e in entries]
        deltas = [d.reshape(-1) for d in deltas]
    else:
        deltas = None  # computed per chunk
    weights = torch.tensor([parameters["weight"][i] for i, _ in entries], dtype=base.dtype,
                           device=base.device).unsqueeze(-1)
    flat_base = base.reshape(-1)
    flat_inputs = [t.reshape(-1) for _, t in entries]
    out = torch.empty_like(base)
    flat_out = out.reshape(-1)
    n = base.numel()
    # Every step below is elementwise across the models' axis (merge_group's order of operations,
    # on [models, chunk] slices instead of [models, *shape]), so chunking changes no bit. It bounds
    # the scratch memory (masks, products) to a few chunks; it is not faster on its own.
    for start in range(0, max(n, 1), chunk):
        end = min(n, start + chunk)
        b = flat_base[start:end]
        if deltas is None:
            d = torch.stack([x[start:end] - b for x in flat_inputs])
        else:
            d = torch.stack([x[start:end] for x in deltas]).to(base.dtype)
        d.mul_(weights)
        if method.consensus_method:
            mask_dtype = torch.int8 if parameters["int8_mask"] else base.dtype
            mask = get_mask(d, method=method.consensus_method, mask_dtype=mask_dtype)
            mixed_delta = (d * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed_delta = d.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if parameters["normalize"]:
            mixed_delta /= divisor
        if parameters["lambda"] != 1:
            mixed_delta *= parameters["lambda"]
        flat_out[start:end] = (b + mixed_delta).to(base.dtype)
    return out
