"""iso_c and iso_cts: isotropic merging (Marczak et al., "No Task Left Behind: Isotropic Model Merging with
Common and Task-Specific Subspaces", ICML 2025).

Iso-C, per 2-D matrix of a transformer block: the SVD of the summed task deltas U S V^T, its singular values
replaced by their mean (a flat spectrum): U (mean(S) I) V^T, added to the base scaled by ``alpha``.
Iso-CTS: the summed deltas' top directions make the common subspace (``common_fraction`` of the rank, default
0.8, rounded so the rest divides among the T tasks); each task adds its own top directions of its delta projected
off the common subspace; the concatenated left and right vectors are orthogonalised (nearest orthonormal
matrices, as the reference code), and all singular values are set to the mean of the kept ones.
Every other tensor (1-D, embeddings, lm_head): the mean of the deltas, as the reference code. Models that left a
matrix unchanged are not its tasks (``task_vectors.changed``).

float32 SVD (torch.linalg.svd), memory bounded by the tensor; tests/merge/test_iso.py checks both against the
formula to 1e-5 relative.
"""

from __future__ import annotations

from surgery.merge import task_vectors as tv
from surgery.merge.backend import Backend

EXACT = "the paper's formula in float32 (SVD); 1e-5 relative of float64"


def iso_c_delta(deltas: list):
    import torch

    u, s, vh = torch.linalg.svd(sum(deltas[1:], deltas[0].clone()), full_matrices=False)
    return (u * s.mean()) @ vh


def split_rank(rank: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common directions, directions per task), as the reference: the task-specific part a multiple of T."""
    per_task = round((rank - int(rank * common_fraction)) / tasks)
    return rank - per_task * tasks, per_task


def iso_cts_delta(deltas: list, common_fraction: float = 0.8):
    import torch

    common, per_task = split_rank(min(deltas[0].shape), len(deltas), common_fraction)
    u, s, vh = torch.linalg.svd(sum(deltas[1:], deltas[0].clone()), full_matrices=False)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    if per_task > 0:
        for d in deltas:
            off = d - us[0] @ (us[0].T @ d)
            ut, st, vht = torch.linalg.svd(off, full_matrices=False)
            us.append(ut[:, :per_task])
            ss.append(st[:per_task])
            vhs.append(vht[:per_task])
    level = torch.cat(ss).mean()
    return (tv.polar(torch.cat(us, 1)) * level) @ tv.polar(torch.cat(vhs, 0))


def _kernel(matrix_delta):
    def kernel(tensors: list, p: dict, parameters: dict):
        import torch

        base, deltas, dtype = tv.split(tensors, p)
        if not deltas:
            return tensors[p["base_index"]].to(dtype)
        if tv.in_block_matrix(base, p):
            tasks = tv.changed(deltas)
            delta = matrix_delta(tasks, p["shared"]) if tasks else torch.zeros_like(base)
        else:
            delta = tv.mean(deltas)
        return tv.finish(base, delta, p["shared"].get("alpha", 1.0), dtype)
    return kernel


iso_c = _kernel(lambda deltas, shared: iso_c_delta(deltas))
iso_cts = _kernel(lambda deltas, shared: iso_cts_delta(deltas, shared.get("common_fraction", 0.8)))

BACKENDS_C = (Backend("iso_c", "torch", iso_c, exact=EXACT, devices=("*",),
                      note="SVD per block matrix; others: mean of the deltas"),)
BACKENDS_CTS = (Backend("iso_cts", "torch", iso_cts, exact=EXACT, devices=("*",),
                        note="SVDs per block matrix (1 + T + 2); others: mean of the deltas"),)
