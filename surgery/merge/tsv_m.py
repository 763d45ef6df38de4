"""tsv_m: Task Singular Vectors: Merging (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in
Model Merging", CVPR 2025).

Per 2-D matrix of a transformer block: the SVD of each task's delta, keeping its top ``rank_fraction`` of the rank
(default 1/T of it, T the number of tasks, as the paper); the kept left and right singular vectors of all tasks,
concatenated, are decorrelated by replacing each concatenation with its nearest orthonormal matrix (Procrustes,
via an SVD, as the paper's reference code does); the merged delta is U_orth diag(S) V_orth^T, added to the base
scaled by ``alpha``. Every other tensor (1-D, embeddings, lm_head): the mean of the deltas, scaled by ``alpha``.
Models that left a matrix unchanged are not its tasks (``task_vectors.changed``).

float32 SVD (torch.linalg.svd), on the node's device; memory: the T deltas and their factors, bounded by the
tensor. tests/merge/test_tsv_m.py checks it against the formula to 1e-5 relative.
"""

from __future__ import annotations

from surgery.merge import task_vectors as tv
from surgery.merge.backend import Backend

EXACT = "the paper's formula in float32 (SVD); 1e-5 relative of float64"


def kept_rank(rank: int, tasks: int, fraction: float | None) -> int:
    """The singular directions kept per task: int(rank * fraction), fraction 1/T by default; at least 1."""
    return max(1, int(rank * (1.0 / tasks if fraction is None else fraction)))


def merged_delta(deltas: list, fraction: float | None = None):
    """The TSV-M merged delta of one matrix from its task deltas (float32)."""
    import torch

    k = kept_rank(min(deltas[0].shape), len(deltas), fraction)
    us, ss, vhs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    u, s, vh = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)
    return tv.polar(u) @ torch.diag(s) @ tv.polar(vh)


def torch_kernel(tensors: list, p: dict, parameters: dict):
    import torch

    base, deltas, dtype = tv.split(tensors, p)
    if not deltas:
        return tensors[p["base_index"]].to(dtype)
    shared = p["shared"]
    if tv.in_block_matrix(base, p):
        tasks = tv.changed(deltas)
        delta = merged_delta(tasks, shared.get("rank_fraction")) if tasks else torch.zeros_like(base)
    else:
        delta = tv.mean(deltas)
    return tv.finish(base, delta, shared.get("alpha", 1.0), dtype)


BACKENDS = (Backend("tsv_m", "torch", torch_kernel, exact=EXACT, devices=("*",),
                    note="SVD per block matrix; others: mean of the deltas"),)
