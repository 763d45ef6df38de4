"""What the data-free subspace and mask methods (``tsv_m``, ``iso``, ``lines``, ``consensus``) share: task vectors
in float32, the Procrustes orthogonalisation, the base-method node a wrapper method runs (``table.run`` computes
it first and hands its result to the wrapper's backend), and the block rule.

The planner (``operations.merge``) gives these methods the tensor's transformer block (``layer``, None outside the
blocks) and the model's block count (``layers``). The SVD methods merge a 2-D matrix by its singular vectors only
inside the blocks, as the papers do (they merge the transformer blocks' matrices); embeddings, lm_head and every
1-D tensor are merged by task arithmetic (the mean of the task vectors), as the papers' reference code does.

A model that left a matrix unchanged (a zero task vector, common when experts touch some layers) is not a task of
that matrix: the singular vectors of a zero matrix are arbitrary, and the orthogonalisation and the isotropic
spectrum would give those arbitrary directions weight (the reference code's result then depends on the SVD
routine). The SVD methods drop such task vectors (``changed``); T counts the others.
"""

from __future__ import annotations

# the base methods a wrapper method (lines, consensus) may run: mergekit's task-arithmetic family
GTA_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
               "della_linear")


def split(tensors: list, p: dict):
    """(the base in float32, the other inputs' task vectors in float32, in input order, the result dtype: the
    inputs' promoted dtype, as mergekit's methods return)."""
    import torch

    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    at = p["base_index"]
    base = tensors[at].to(torch.float32)
    return base, [t.to(torch.float32) - base for k, t in enumerate(tensors) if k != at], dtype


def in_block_matrix(t, p: dict) -> bool:
    """A 2-D matrix of a transformer block: merged through its singular vectors (others by task arithmetic)."""
    return t.ndim == 2 and p.get("layer") is not None and min(t.shape) > 1


def changed(deltas: list) -> list:
    """The task vectors that are not all zero (the tasks of this matrix)."""
    return [d for d in deltas if bool(d.any())]


def mean(deltas: list):
    """The mean of the task vectors (task arithmetic with weights 1/T), as the papers merge 1-D tensors."""
    out = deltas[0].clone()
    for d in deltas[1:]:
        out += d
    return out / len(deltas)


def polar(x):
    """The orthonormal matrix nearest to ``x`` (Procrustes: U @ Vh of its SVD), as TSV-M and Iso-CTS
    decorrelate the concatenated singular vectors."""
    import torch

    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def finish(base, delta, alpha: float, dtype):
    """base + alpha * delta, computed in float32, returned in the result dtype."""
    return (base + alpha * delta).to(dtype)


def base_node(p: dict, method: str | None = None) -> dict:
    """The node of ``method`` on the same inputs: the parameters that method takes (the others are the wrapper's
    own), those left unset (None) at that method's defaults."""
    from surgery.merge.specs import spec_of

    method = method or p["shared"]["base_method"]
    spec = spec_of(method)

    def kept(values: dict, scope) -> dict:
        out = {}
        for q in scope:
            v = values.get(q.name)
            if v is None and not q.required:
                v = q.validate(q.default)
            if v is not None:
                out[q.name] = v
        return out
    per_input = {}
    for k, i in enumerate(p["ids"]):
        scope = [q for q in spec.per_input if not (k == p["base_index"] and q.scope == "non_base")]
        per_input[i] = kept(p["per_input"].get(i, {}), scope)
    return {**p, "method": method, "shared": kept(p["shared"], spec.shared), "per_input": per_input}
