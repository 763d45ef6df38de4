"""lines: LiNeS, layer-increasing network scaling (Wang et al., "LiNeS: Post-training Layer Scaling Prevents
Forgetting and Enhances Model Merging", ICLR 2025).

The merged task vector of a base method (``base_method``: task_arithmetic, ties, dare_ties, ...; its own
parameters pass through) is scaled by depth: block l of L gets alpha + (beta - alpha) * l / (L - 1), so shallow
layers stay near the base (general features) and deep layers take the tasks. Tensors outside the blocks
(embeddings, final norm, lm_head) get alpha. The planner gives the tensor's block and the model's block count.

The base method is computed by its own backend (bitwise mergekit's); the scaling is one float32 step, base +
s * (merged - base), rounded to the merged tensor's dtype (s = 1 returns the base method's tensor unchanged).
"""

from __future__ import annotations

from surgery.merge.backend import Backend

EXACT = "the base method's backend, then one float32 scaling step"


def depth_scale(alpha: float, beta: float, layer: int | None, layers: int) -> float:
    """LiNeS' factor for block ``layer`` of ``layers`` (alpha outside the blocks and in a one-block model)."""
    if layer is None or layers <= 1:
        return alpha
    t = layer / (layers - 1)
    return alpha * (1 - t) + beta * t  # = alpha + (beta - alpha) t, exactly alpha and beta at the ends


def torch_kernel(tensors: list, p: dict, merged):
    """``merged``: the base method's result on these tensors (``table.run``)."""
    import torch

    s = depth_scale(p["shared"].get("alpha", 0.0), p["shared"].get("beta", 1.0), p.get("layer"), p.get("layers", 0))
    if s == 1.0:
        return merged
    base = tensors[p["base_index"]].to(torch.float32)
    return (base + s * (merged.to(torch.float32) - base)).to(merged.dtype)


BACKENDS = (Backend("lines", "torch", torch_kernel, exact=EXACT, devices=("*",), wraps=True,
                    note="the base method's backend, scaled by depth"),)
