"""What the host backends (numpy and compiled) of every method share: converting the inputs to the merge dtype,
and wrapping a step into the ``core.graph.HostKernel`` the executor runs (``core.host_math``)."""

from __future__ import annotations

from typing import Callable

from surgery.core.graph import HostKernel
from surgery.merge.numeric import round_to

IO_MAX = 8  # inputs of the compiled kernels' bfloat16-in, bfloat16-out form


def converted(arrays: list, params: dict, stored: list[str], dtype: str) -> list:
    """mergekit's ``dtype``: the inputs rounded to the merge dtype first (the others are already exact in it)."""
    import numpy as np

    if not params.get("dtype"):
        return arrays
    return [a if s == dtype else round_to(a.copy(), dtype, np.empty(a.shape, np.uint32))
            for a, s in zip(arrays, stored)]


def flat(arrays: list) -> list:
    import numpy as np

    return [np.ascontiguousarray(a).reshape(-1) for a in arrays]


def elementwise(params: dict, dtype: str, stored: list[str], step: Callable,
                stored_step: Callable | None = None) -> HostKernel:
    """A row-block kernel from ``step(xs, out, scratch)`` (float32 arrays of one length; ``scratch``: uint32).

    ``stored_step(raws, out)``: the same on bfloat16 bit patterns (uint16 arrays), returning the non-finite count;
    used where inputs, merge and output are all bfloat16 (no float32 copies at all)."""
    import numpy as np

    def run(arrays):
        xs = flat(converted(arrays, params, stored, dtype))
        out = np.empty(xs[0].size, dtype=np.float32)
        step(xs, out, np.empty(out.size, dtype=np.uint32))  # host_math's row blocks keep the arrays cache-sized
        return out.reshape(arrays[0].shape)

    def run_stored(read_raws, out_dtype: str, out):
        if out_dtype != "BF16" or set(stored) != {"BF16"} or dtype != "BF16" or len(stored) > IO_MAX:
            return None
        return stored_step([r.view(np.uint16) for r in read_raws()], out.reshape(-1))

    return HostKernel(run=run, blockwise=True, run_stored=run_stored if stored_step is not None else None)
