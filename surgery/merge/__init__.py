"""Merge math: every merge method surgery computes, one module per method, behind one backend table.

    from surgery import merge
    merge.compute(tensors, params)        # torch tensors in, the merged tensor out (the torch path)
    merge.host_kernel(params, stored)     # a core.graph.HostKernel (numpy/compiled), or None: torch computes it
    merge.table.choose(params, stored)    # which backend computes this node, and why (``table``)

A node's ``params`` are what ``operations.merge`` plans for one tensor: ``method``, ``ids`` (the inputs in order),
``base_index``, ``shared`` and ``per_input`` parameters (resolved for this tensor), ``dtype``, ``kernel``, ``seed``,
``name``.

Layout:
    table.py            the backend table (what each backend can do) and the one rule that picks (``choose``)
    linear.py           linear: compiled, numpy, torch (chunked)
    task_arithmetic.py  task arithmetic: compiled, numpy, torch
    ties.py             TIES: compiled (whole tensors), torch exact, torch fast (``kernel: fast``)
    gta.py              the torch driver of the task-arithmetic family (also breadcrumbs, breadcrumbs_ties)
    tsv_m.py, iso.py    surgery's own SVD methods: TSV-M; Iso-C and Iso-CTS (torch, float32 SVD)
    lines.py            LiNeS: a base method's merge scaled by depth
    consensus.py        consensus merging (TALL masks) over task_arithmetic or ties
    task_vectors.py     what those four share (task vectors, Procrustes, a wrapper's base-method node)
    mergekit_kernel.py  mergekit's own kernels: every method, and the reference
    topk.py             the exact top-k of TIES (a replay of torch's unstable sort), compiled or numpy
    numeric.py, host.py float32 steps rounded like torch's; what the host backends share
    specs.py            the methods' parameter specs; settings.py: mergekit's parameter settings (filters, gradients)
    native.py           the compiled modules (_elementwise.c, _introsort.c)

Adding a method or a backend: see CONTRIBUTING.md ("Adding a merge method or backend").
"""

from __future__ import annotations

HOST_METHODS = ("linear", "task_arithmetic", "ties")  # methods with host backends: their result dtype is known


def host_kernel(params: dict, stored: list[str]):
    """The HostKernel computing this node without torch, or None where the chosen backend is torch's or mergekit's."""
    from surgery.merge.numeric import merge_dtype
    from surgery.merge.table import choose

    if params["method"] not in HOST_METHODS:
        return None
    b = choose(params, stored)
    return b.kernel(params, merge_dtype(params, stored), stored) if b.host else None


def compute(tensors: list, p: dict, permute=None):
    """The merged tensor, computed with torch by the node's backend (``table.choose``) on the current device.

    ``permute(tensors)``: applied after the inputs are moved and converted (union vocabularies re-index rows)."""
    import torch
    from mergekit.merge_methods.buffers import copy_non_floating_buffer

    from surgery.core.devices import current_device
    from surgery.io.safetensors import st_dtype
    from surgery.merge.table import choose, run

    buffer = copy_non_floating_buffer(tensors, p["name"])
    if buffer is not None:
        return buffer
    device = current_device()  # --device cuda: the inputs stream to the GPU, the writer brings the result back
    if device != "cpu":
        tensors = [t.to(device) for t in tensors]
    if p.get("dtype"):
        tensors = [t.to(getattr(torch, p["dtype"])) for t in tensors]
    if permute is not None:
        tensors = permute(tensors)
    backend = choose(p, [st_dtype(t.dtype) for t in tensors], device, host=False)
    return run(backend, tensors, p, device)


def result_dtype(params: dict, stored: tuple[str, ...]) -> str | None:
    """The safetensors dtype the method returns for these input dtypes (run on 4x4 tensors where not known).

    mergekit writes a method's result in the dtype it comes out in (arcee_fusion returns float32 for bfloat16
    inputs), so the plan does the same unless an output dtype is set."""
    if params["method"] in HOST_METHODS and params.get("vocab") is None:
        from surgery.merge.numeric import merge_dtype

        known = merge_dtype(params, list(stored))  # these methods return their merge dtype: no torch needed
        if known is not None:
            return known
    import torch

    from surgery.io.safetensors import st_dtype, torch_dtype

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(4, 4, generator=gen).to(torch_dtype(d)) for d in stored]
    if not all(t.is_floating_point() for t in tensors):
        return None
    try:
        return st_dtype(compute(tensors, {**params, "name": "probe", "seed": 0, "vocab": None}).dtype)
    except Exception:  # noqa: BLE001 - the real tensors will report the problem with their name
        return None
