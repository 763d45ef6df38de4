"""Non-finite values (NaN, ±Inf): counted as tensors are computed, refused in outputs unless allowed.

    check_finite(entry, tensor, plan.inputs)    # SurgeryError naming the tensor and the inputs that hold NaN/Inf

Only computed tensors pass through here. A tensor copied unchanged from an input is a byte copy of the
input (what the input holds, the output holds); the check reports the inputs, so a NaN in a copied tensor
is named the first time a computed tensor reads it.
"""

from __future__ import annotations

from surgery.errors import SurgeryError


def count_nonfinite(tensor) -> int:
    """Number of NaN/Inf elements (0 for integer tensors) of a torch tensor or a float32 numpy array."""
    if _is_numpy(tensor):
        import numpy as np

        if tensor.size == 0 or np.isfinite(tensor.sum()):
            return 0
        return int(tensor.size - np.count_nonzero(np.isfinite(tensor)))
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    if bool(torch.isfinite(tensor.sum())):  # NaN and ±Inf always reach the sum: one fast pass (~30x isfinite's)
        return 0
    finite = torch.isfinite(tensor)  # the sum may also overflow on finite values: count exactly
    return int(finite.numel() - finite.sum())


def check_finite(entry, tensor, inputs: dict) -> None:
    """Refuse an output tensor holding NaN or Inf; the message names the inputs' tensors that hold them."""
    n = count_nonfinite(tensor)
    if n:
        raise nonfinite_error(entry, n, inputs)
    n = count_over_range(entry, tensor)
    if n:
        raise over_range_error(entry, n)


def nonfinite_error(entry, n: int, inputs: dict) -> SurgeryError:
    """The refusal of a computed tensor with ``n`` NaN/Inf values, naming the inputs' tensors that hold them."""
    from surgery.core.graph import refs

    culprits = []
    for ref in refs(entry.node):
        src = inputs.get(ref.input)
        try:
            k = count_nonfinite(src.get(ref.name)) if src is not None else 0
        except Exception:  # noqa: BLE001 - the report is best effort; the refusal stands regardless
            k = 0
        if k:
            culprits.append(f"{k} in {src.ref}:{ref.name}")
    origin = ("; the inputs hold them: " + ", ".join(dict.fromkeys(culprits))) if culprits else \
        "; the inputs are finite, so the operation produced them (overflow?)"
    return SurgeryError(f"tensor {entry.name!r}: {n} non-finite values (NaN/Inf) in the output{origin}; "
                        "pass --allow-nonfinite to write them anyway")


NARROW = {"F16": 65504.0, "F8_E4M3": 448.0, "F8_E5M2": 57344.0}  # largest finite value of each narrow dtype


def count_over_range(entry, tensor) -> int:
    """Finite float32 values past the output dtype's range (the writer's cast would make them Inf)."""
    limit = NARROW.get(entry.dtype)
    if limit is None:
        return 0
    if _is_numpy(tensor):
        if tensor.dtype.kind != "f" or tensor.itemsize < 4 or tensor.size == 0:
            return 0
        if max(-float(tensor.min()), float(tensor.max())) <= limit:
            return 0
        import numpy as np

        return int(np.count_nonzero(np.abs(tensor) > limit))
    from surgery.io.safetensors import torch_dtype

    if not tensor.is_floating_point() or tensor.dtype == torch_dtype(entry.dtype) or tensor.numel() == 0 \
            or float(tensor.abs().max()) <= limit:
        return 0
    return int((tensor.abs() > limit).sum())


def over_range_error(entry, n: int) -> SurgeryError:
    return SurgeryError(f"tensor {entry.name!r}: {n} values exceed the {entry.dtype} range (|x| > "
                        f"{NARROW[entry.dtype]:g}) and would be written as Inf; use a wider output dtype, or pass "
                        "--allow-nonfinite to write them anyway")


def _is_numpy(x) -> bool:
    return type(x).__module__ == "numpy"


def check_sums_finite(name: str, sums: dict[str, float], sources: dict) -> None:
    """Refuse a tensor whose reductions (``sums``: source label -> Σx²) are not finite, naming the source
    that holds NaN/Inf (``sources``: label -> TensorSource, re-read only on this error path)."""
    import math

    if all(math.isfinite(v) for v in sums.values()):
        return
    for label, src in sources.items():
        n = count_nonfinite(src.get(name))
        if n:
            raise SurgeryError(f"{src.ref}: tensor {name!r} holds {n} non-finite values (NaN/Inf); "
                               "statistics over it would be meaningless")
    raise SurgeryError(f"tensor {name!r}: its differences overflow float32")
