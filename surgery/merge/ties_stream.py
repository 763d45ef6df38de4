"""mergekit's TIES (``ties``'s compiled backend, the same bytes) on a tensor of any size in bounded memory.

``ties._merge`` holds every input and delta as whole float32 arrays plus introsort's keys and permutation:
17.4 GB for 16 layers of Llama-3.1-8B, dominated by the 525M-entry embedding and lm_head. Here the merge is two
passes over row blocks, each input read a block at a time:

1. Selection, per model: mergekit keeps the k = int(density * n) entries of |delta| its unstable argsort puts
   first. A histogram of the magnitude bit patterns (``topk.magnitude_keys``: 32768 bins for bfloat16, two
   passes of 32768 and 65536 bins for float32) gives the k-th largest key T exactly and the counts above and at
   it. Entries above T are kept, below dropped. Only the entries EQUAL to T depend on the sort's order; where all
   of them are kept, or T is 0 (a zero delta is ±0 kept or not), nothing else is needed. Otherwise
   ``topk_stream.select`` replays introsort's partitions from streams, then in memory on a segment of at most
   ``BUDGET`` entries, and marks the kept ties in a bitmap (n / 8 bytes).
2. The merge, block by block (``core.host_math`` runs it like an elementwise kernel): each delta ``r(x - base)``
   masked by its selection, then the compiled ``ties`` kernel (sign election, sum, lambda).

Memory: a few blocks, one bitmap per model, and the last segment (~11 bytes per entry: keys, indices, the
replay's permutation and mask); plus the output tensor the executor holds. Tensors below ``MIN_ENTRIES`` keep the
whole-array path (faster: one pass per step in C).
"""

from __future__ import annotations

import math

MIN_ENTRIES = 1 << 25  # 128 MB of float32 per input: smaller tensors merge as whole arrays
BUDGET = 64 << 20  # entries of the last segment of the replay, read into memory (~0.7 GB)
BLOCK_BYTES = 4 << 20  # float32 bytes per input and row block of the selection pass


def prepare(read, params: dict, stored: list[str], shape: tuple):
    """``HostKernel.prepare`` of TIES's compiled backend: the per-model selections (pass 1), as a kernel
    ``f(arrays, rows)`` computing row blocks (pass 2); None where the whole-array kernel runs instead (small tensors,
    NaN, a replay that is not exact). ``read(i, (a, b))``: the stored bytes of rows a:b of argument i."""
    from surgery.merge.numeric import merge_dtype

    n = math.prod(shape)
    if params["method"] != "ties" or len(shape) < 1 or n < MIN_ENTRIES:
        return None

    dtype = merge_dtype(params, stored)
    at = params["base_index"]
    cols = n // shape[0] if shape[0] else 1
    block = max(1, BLOCK_BYTES // (4 * cols)) * cols

    def keys_of(k):
        def keys(s: int, e: int):
            rows = (s // cols, -(-e // cols))
            x, base = (_values(read(j, rows), stored[j], dtype).reshape(-1) for j in (k, at))
            return _keys(_delta(x, base, dtype), dtype)
        return keys

    selections = []
    for k, i in enumerate(params["ids"]):
        if k == at:
            continue
        density = float(params["per_input"][i]["density"])
        sel = select_model(keys_of(k), n, block, density, dtype) if 0 < density < 1 else ("all" if density >= 1
                                                                                          else "zero",)
        if sel is None:
            return None
        selections.append((k, sel))
    return _Kernel(params, stored, dtype, cols, selections).block


def select_model(keys_of, n: int, block: int, density: float, dtype: str):
    """One model's selection: ``("ge", T)`` (keys >= T kept), ``("tie", T, bitmap)`` (keys above T, and those at T
    whose bit is set), or None (NaN, or a replay that is not exact: the real sort decides)."""
    import numpy as np

    from surgery.merge import topk_stream

    keep = max(1, int(density * n))
    source = topk_stream.Source(n, keys_of, block, narrow=dtype != "F32")
    found = _threshold(source, keep, dtype == "F32")
    if found is None:
        return None
    tie, above, equal = found
    if keep - above >= equal or tie == 0:
        return ("ge", tie)
    bitmap = np.zeros((n + 7) // 8, np.uint8)

    def on_kept(idx):
        np.bitwise_or.at(bitmap, idx >> 3, np.left_shift(1, idx & 7).astype(np.uint8))

    if not topk_stream.select(source, keep, BUDGET, tie, on_kept):
        return None
    return ("tie", tie, bitmap)


def _threshold(source, k: int, wide: bool):
    """(T, entries above T, entries equal to T) for the k-th largest key, from histograms of the key bits; None
    for NaN keys."""
    import numpy as np

    infinity = 0x7F800000 if wide else 0x7F80  # 16-bit keys: bfloat16's infinity is the larger
    high = np.zeros(1 << 15, np.int64)
    for _, keys, _ in source.fwd(0):
        if keys.size and int(keys.max()) > infinity:
            return None
        high += np.bincount(keys >> 16 if wide else keys, minlength=1 << 15)
    top, above = _kth(high, k)
    if not wide:
        return top, above, int(high[top])
    low = np.zeros(1 << 16, np.int64)
    for _, keys, _ in source.fwd(0):
        low += np.bincount(keys[(keys >> 16) == top] & 0xFFFF, minlength=1 << 16)
    bottom, above_low = _kth(low, k - above)
    return top << 16 | bottom, above + above_low, int(low[bottom])


def _kth(counts, k: int):
    """The bin of the k-th largest entry of a histogram, and the entries in higher bins."""
    import numpy as np

    from_top = np.cumsum(counts[::-1])
    j = int(np.searchsorted(from_top, k))
    return counts.size - 1 - j, int(from_top[j - 1]) if j else 0


def _values(raw, stored: str, dtype: str):
    """Stored bytes -> float32 values of the merge dtype (mergekit's ``dtype`` converts the inputs first)."""
    import numpy as np

    from surgery.core.host_math import to_float32
    from surgery.merge.numeric import round_to as _round

    x = to_float32(raw, stored)
    return x if stored == dtype else _round(x.copy(), dtype, np.empty(x.shape, np.uint32))


def _delta(x, base, dtype: str):
    import numpy as np

    from surgery.merge.numeric import round_to as _round

    return _round(x - base, dtype, np.empty(base.shape, np.uint32))


def _keys(delta, dtype: str):
    """int32 keys ordered like |delta| (``topk.magnitude_keys_numpy``, widened)."""
    import numpy as np

    bits = delta.reshape(-1).view(np.uint32)
    return ((bits >> 16) & 0x7FFF).astype(np.int32) if dtype != "F32" else (bits & 0x7FFFFFFF).view(np.int32)


class _Kernel:
    """Pass 2: the merge of a row block with the selections made (``ties._merge`` after its top-k)."""

    def __init__(self, params: dict, stored: list[str], dtype: str, cols: int, selections: list):
        from surgery.merge import native
        from surgery.merge.numeric import scalar as _scalar

        self.params, self.stored, self.dtype, self.cols, self.selections = params, stored, dtype, cols, selections
        self.weights = [_scalar(float(params["per_input"][params["ids"][k]]["weight"]), dtype) for k, _ in selections]
        shared = params["shared"]
        self.normalize, self.lam = bool(shared.get("normalize", True)), float(shared.get("lambda", 1.0))
        self.native = native.load("_elementwise")

    def block(self, arrays: list, rows: tuple):
        import numpy as np

        from surgery.merge.numeric import round_to as _round

        dtype, at = self.dtype, self.params["base_index"]
        flat = [(a if s == dtype else _round(a.copy(), dtype, np.empty(a.shape, np.uint32))).reshape(-1)
                for a, s in zip(arrays, self.stored)]
        base, out = flat[at], np.empty(flat[at].size, np.float32)
        if not self.selections:
            out[...] = base
            return out.reshape(arrays[0].shape)
        deltas = []
        for k, sel in self.selections:
            delta = _delta(flat[k], base, dtype)
            if sel[0] == "zero":
                delta = np.zeros_like(delta)
            elif sel[0] != "all":
                keys = _keys(delta, dtype)
                mask = keys >= sel[1] if sel[0] == "ge" else (keys > sel[1]) | ((keys == sel[1]) &
                                                                                self._bits(sel[2], rows, keys.size))
                delta *= mask
            deltas.append(delta)
        self.native.ties(out, base, deltas, self.weights, self.normalize, self.lam, dtype == "BF16")
        return out.reshape(arrays[0].shape)

    def _bits(self, bitmap, rows: tuple, size: int):
        import numpy as np

        s = rows[0] * self.cols
        return np.unpackbits(bitmap[s >> 3:(s + size + 7) >> 3], bitorder="little")[s & 7:(s & 7) + size].view(bool)
