"""consensus: consensus merging with TALL masks (Wang et al., "Localizing Task Information for Improved Model
Merging and Compression", ICML 2024).

Per task t a mask keeps the entries where the task vector matters to it: |tau_t| >= mask_lambda * |tau_MTL -
tau_t|, tau_MTL the summed task vector; the consensus mask keeps entries that at least ``k`` tasks' masks keep
(default 2: entries only one task uses are selfish, none uses are catastrophic). The merged tensor is the base
method's (``base_method``: task_arithmetic or ties, its parameters passed through) where the consensus mask
holds, the base elsewhere.

The masks are computed in float32, one task at a time (memory: a few tensors); the base method by its own backend
(bitwise mergekit's), so kept entries equal the base method's bit for bit.
"""

from __future__ import annotations

from surgery.merge import task_vectors as tv
from surgery.merge.backend import Backend

EXACT = "the base method's backend where the float32 mask holds, the base elsewhere"
BASE_METHODS = ("task_arithmetic", "ties")


def consensus_mask(deltas: list, mask_lambda: float, k: int):
    """Entries kept by at least ``k`` of the tasks' TALL masks."""
    import torch

    total = sum(deltas[1:], deltas[0].clone())
    votes = torch.zeros(total.shape, dtype=torch.int32, device=total.device)
    for d in deltas:
        votes += (d.abs() >= mask_lambda * (total - d).abs()).to(torch.int32)
    return votes >= k


def torch_kernel(tensors: list, p: dict, merged):
    """``merged``: the base method's result on these tensors (``table.run``)."""
    import torch

    base, deltas, _ = tv.split(tensors, p)
    if not deltas:
        return merged
    keep = consensus_mask(deltas, p["shared"].get("mask_lambda", 0.6), p["shared"].get("k", 2))
    return torch.where(keep, merged, tensors[p["base_index"]].to(merged.dtype))


BACKENDS = (Backend("consensus", "torch", torch_kernel, exact=EXACT, devices=("*",), wraps=True,
                    note="the base method's backend, masked"),)
