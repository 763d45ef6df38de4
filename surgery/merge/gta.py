"""The torch backend of mergekit's task-arithmetic family (task_arithmetic, ties, breadcrumbs, breadcrumbs_ties).

mergekit sparsifies each model's delta one after the other; for TIES that is a full argsort per model and tensor,
which is most of the merge time. ``gta_parallel`` runs the same steps with mergekit's own functions (``sparsify``,
``get_mask``) in the same order, but sparsifies the models' deltas concurrently, one thread per model (torch
releases the GIL), and combines them on chunks. The arithmetic is unchanged, so results are bitwise equal to
mergekit's (tests/mergekit/test_mergekit_parity.py checks every method through this path). TIES passes its own magnitude
sparsifier (``ties.magnitude_exact``, or ``ties.magnitude_select`` for ``kernel: fast``). Random sparsification
(DARE, DELLA) is left to mergekit: its draws depend on the order of calls.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from surgery.merge.backend import Backend

_POOL: ThreadPoolExecutor | None = None


def pool() -> ThreadPoolExecutor:
    """Threads for per-model work (sparsification): one per core, at least 2."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="surgery-merge")
    return _POOL


def gta_parallel(tensors: list, p: dict, parameters: dict, magnitude=None, chunk: int = 1 << 22):
    """GeneralizedTaskArithmeticMerge.merge_group, with the per-model sparsification in parallel.

    ``magnitude(delta, density, rescale_norm)``: the magnitude sparsifier (default mergekit's ``magnitude``).
    """
    import torch
    from mergekit import merge_methods
    from mergekit.merge_methods.dtype import promoted_dtype  # noqa: F401 - same promotion as mergekit
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify
    from mergekit.sparsify import magnitude as mergekit_magnitude

    method_name, ids, base_index = p["method"], p["ids"], p["base_index"]
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
            delta = (magnitude or mergekit_magnitude)(delta, parameters["density"][i],
                                                      RescaleNorm.l1 if parameters["rescale"] else None)
        elif method.sparsification_method:
            delta = sparsify(delta, density=parameters["density"][i], method=method.sparsification_method,
                             rescale_norm=RescaleNorm.l1 if parameters["rescale"] else None,
                             **{key: parameters[key][i] for key in ("gamma", "epsilon") if key in parameters
                                and any(p.name == key for p in spec.parameters)})
        return delta

    if method.sparsification_method:
        if len(entries) > 1:
            deltas = list(pool().map(delta_of, entries))
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


BACKENDS = (Backend("breadcrumbs", "torch", gta_parallel, devices=("cpu", "cuda"),
                    note="the models sparsified on parallel threads"),)
