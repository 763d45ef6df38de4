"""The operations a recipe can list, by name.

Each operation is one class (a subclass of ``surgery.recipe.schema.Operation``): its recipe fields,
its name (``op_name``) and its planner (``plan(ctx)``). The built-ins are listed here explicitly;
``register`` adds another (see CONTRIBUTING.md).
"""

from __future__ import annotations

from surgery.operations.adapters import AdaMergeX, ApplyAdapters
from surgery.operations.basic import Arithmetic, Blend, LayerSwap, Take
from surgery.operations.merge import Merge
from surgery.operations.neurons import RankedLayerSwap, ResetNeurons, TransplantNeurons
from surgery.recipe.schema import Operation

BUILTIN: tuple[type[Operation], ...] = (LayerSwap, Arithmetic, Take, Blend, Merge, RankedLayerSwap,
                                        TransplantNeurons, ResetNeurons, ApplyAdapters, AdaMergeX)
OPERATIONS: dict[str, type[Operation]] = {op.op_name: op for op in BUILTIN}


def register(op: type[Operation]) -> type[Operation]:
    """Add an operation class (usable as a class decorator). Its ``op_name`` must be new."""
    if not op.op_name:
        raise ValueError(f"{op.__name__} has no op_name")
    if op.op_name in OPERATIONS:
        raise ValueError(f"operation {op.op_name!r} is already registered")
    OPERATIONS[op.op_name] = op
    return op
