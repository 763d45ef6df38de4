"""Virtual inputs: inputs whose tensors are op trees over other inputs (an adapter over its base, a
checkpoint's experts read fused). Planners see them as checkpoints; ``make_plan`` expands every ref to one
before execution, so the executor only reads files."""

from __future__ import annotations

from abc import ABC, abstractmethod

from surgery.core.graph import Node, Ref


class VirtualInput(ABC):
    """An input whose tensors are op trees over other inputs (an adapter over its base): planners see it
    as a checkpoint (``keys``, ``meta``, ``get``), and before execution every ref to it is expanded."""

    @abstractmethod
    def expand(self, ref: Ref):
        """The op tree that computes ``ref``'s tensor from the other inputs."""


def expand_virtual(node, inputs: dict):
    """Replace refs to virtual inputs (adapters, fused experts) by their op trees, until none is left."""
    if isinstance(node, Ref):
        ck = inputs.get(node.input)
        return expand_virtual(ck.expand(node), inputs) if isinstance(ck, VirtualInput) else node
    args = [expand_virtual(a, inputs) for a in node.args]
    return node if all(a is b for a, b in zip(args, node.args)) else Node(node.op, args, node.params)
