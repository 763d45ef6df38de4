"""Non-finite values (NaN, ±Inf): counted as tensors are computed, refused in outputs unless allowed.

    check_finite(entry, tensor, plan.inputs)    # SurgeryError naming the tensor and the inputs that hold NaN/Inf

Only computed tensors pass through here. A tensor copied unchanged from an input is a byte copy of the
input (what the input holds, the output holds); the check reports the inputs, so a NaN in a copied tensor
is named the first time a computed tensor reads it.
"""

from __future__ import annotations

from surgery.errors import SurgeryError


def count_nonfinite(tensor) -> int:
    """Number of NaN/Inf elements (0 for integer tensors)."""
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
    if n == 0:
        _check_cast(entry, tensor)
        return
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
    raise SurgeryError(f"tensor {entry.name!r}: {n} non-finite values (NaN/Inf) in the output{origin}; "
                       "pass --allow-nonfinite to write them anyway")


def _check_cast(entry, tensor) -> None:
    """A finite float32 value past float16's range becomes Inf when the writer casts it: refuse it here."""
    import torch

    from surgery.io.safetensors import torch_dtype

    if entry.dtype not in ("F16", "F8_E4M3", "F8_E5M2") or not tensor.is_floating_point():
        return
    limit = torch.finfo(torch_dtype(entry.dtype)).max
    if tensor.dtype == torch_dtype(entry.dtype) or tensor.numel() == 0 or float(tensor.abs().max()) <= limit:
        return
    n = int((tensor.abs() > limit).sum())
    raise SurgeryError(f"tensor {entry.name!r}: {n} values exceed the {entry.dtype} range (|x| > {limit:g}) and would "
                       "be written as Inf; use a wider output dtype, or pass --allow-nonfinite to write them anyway")


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
