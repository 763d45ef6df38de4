"""mergekit's TIES selection, exactly, without sorting: which k entries its unstable argsort puts first.

mergekit (sparsify.magnitude) keeps ``argsort(|delta|.float(), descending=True)[:k]``. On CPU,
torch sorts with ``std::sort`` (libstdc++'s introsort: median-of-three pivot, Hoare partition,
insertion sort below 16 elements) comparing values only, so among entries EQUAL to the threshold
magnitude (common in bfloat16) the kept ones are those that introsort's partitions happen to move
forward. That order is a deterministic function of the input, and introsort never moves an entry
across a partition boundary once it is cut, so the first k positions depend only on the partitions
that contain position k: a quickselect that replays exactly those partitions (vectorised: a Hoare
partition swaps the i-th entry <= pivot from the left with the i-th entry >= pivot from the right
while they have not crossed) finds the same k entries in O(n) instead of O(n log n).

``top_k_mask`` returns None where replaying is not exact (NaNs, introsort's heapsort fallback after
its depth limit, non-CPU tensors); callers then sort as mergekit does. ``tests/merge/test_topk.py``
checks the result against ``torch.argsort`` on inputs full of ties. The replay runs in a compiled kernel
(``_introsort.c``, built by ``setup.py``; 3-4x faster than numpy) where it is built, else in vectorised numpy
(``_replay``); ``--backend numpy`` forces the numpy replay.
"""

from __future__ import annotations

import math

THRESHOLD = 16  # libstdc++ _S_threshold: introsort leaves segments this short to the final insertion sort


def top_k_mask(w, k: int, *, overwrite: bool = False):
    """Bool mask of the entries at positions [0, k) of ``torch.argsort(w, descending=True)`` (w: 1-D, CPU),
    or None where replaying introsort is not exact. ``overwrite``: w may be rearranged (saves a copy).

    ``w`` may also be integer keys that compare (<, ==) exactly as the float values would: see
    ``magnitude_keys`` (half the bytes to move for bfloat16).
    """
    import torch

    if w.device.type != "cpu" or w.dim() != 1 or not 0 <= k <= w.numel():
        return None
    if w.dtype == torch.bfloat16:
        w, overwrite = w.float(), True  # numpy has no bfloat16; float32 orders the same
    keys = w.numpy() if overwrite else w.numpy().copy()  # the array as introsort rearranges it
    mask = top_k_mask_numpy(keys, k)
    return None if mask is None else torch.from_numpy(mask)


def top_k_mask_numpy(keys, k: int, depth: int = -1):
    """``top_k_mask`` on a 1-D numpy array of keys, which it may reorder: a bool array, or None where
    replaying introsort is not exact (NaNs, its heapsort fallback). int16, int32 and float32 keys go to the
    compiled kernel (``_introsort.c``) unless it is not built or the backend level is not 'auto'; others to the numpy
    replay. ``depth``: introsort's depth limit left where ``keys`` is a segment that earlier partitions cut out
    of a larger array (``ties_stream``); -1: a whole array."""
    import numpy as np

    n = keys.size
    if keys.ndim != 1 or not 0 <= k <= n:
        raise ValueError(f"top_k_mask_numpy: need 1-D keys and 0 <= k <= {n}, got shape {keys.shape}, k={k}")
    if n and keys.dtype.kind == "f" and math.isnan(float(keys.sum(dtype=np.float64))):
        return None  # a NaN (or inf - inf): let the real sort decide
    if k in (0, n):
        return np.full(n, k == n, dtype=bool)
    if not (keys.flags.c_contiguous and keys.flags.writeable):
        keys = keys.copy()
    native = _native()
    if native is not None and keys.dtype in (np.int16, np.int32, np.float32):
        mask = np.empty(n, dtype=bool)
        return mask if native.top_k(keys, k, mask, depth) else None
    return _replay(keys, k, depth)


def _native():
    """The compiled kernel, or None (not built, or the backend level is not 'auto')."""
    from surgery.merge import native

    return native.load("_introsort")


def _replay(vals, k: int, depth: int = -1):
    """The numpy replay of introsort's partitions around position k (0 < k < n); reorders vals."""
    import numpy as np

    n = vals.size
    perm = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)  # original index at each position
    lo, hi = 0, n
    depth = 2 * (n.bit_length() - 1) if depth < 0 else depth  # std::__lg(n) * 2
    while hi - lo > THRESHOLD and lo < k < hi:
        if depth == 0:
            return None  # introsort would heapsort this segment
        depth -= 1
        cut = _partition(vals, perm, lo, hi, k)
        if cut is None:
            return None
        if k <= cut:          # everything from cut on sorts after position k
            hi = cut
        else:                 # everything before cut sorts before position k
            lo = cut
    mask = np.zeros(n, dtype=bool)
    mask[perm[:lo if lo < k < hi else min(k, hi)]] = True
    if lo < k < hi:  # the final insertion sort is stable within the segment (Python ints: no overflow)
        seg = vals[lo:hi].tolist()
        order = sorted(range(hi - lo), key=lambda i: -seg[i])[:k - lo]
        mask[perm[lo:hi][order]] = True
    return mask


def _partition(vals, perm, lo: int, hi: int, k: int) -> int | None:
    """std::__unguarded_partition_pivot on [lo, hi), applied to vals and perm; returns the cut. The side
    without position k is left as the caller still reads it: the set of its entries, not their order."""
    import numpy as np

    mid = lo + (hi - lo) // 2
    a, b, c = lo + 1, mid, hi - 1
    va, vb, vc = vals[a], vals[b], vals[c]
    # std::__move_median_to_first(lo, a, b, c) with comp(x, y) = x > y (torch's descending comparator)
    if va > vb:
        m = b if vb > vc else c if va > vc else a
    else:
        m = a if va > vc else c if vb > vc else b
    vals[lo], vals[m] = vals[m], vals[lo]
    perm[lo], perm[m] = perm[m], perm[lo]
    p = vals[lo]
    seg, segp = vals[lo + 1:hi], perm[lo + 1:hi]
    stops = _Stops(seg <= p, seg >= p)  # where the left scan stops (<= pivot), where the right one does (>= pivot)
    # the t-th stops swap while left(t) < right(t); left - right increases, so bisect for the first crossing
    i, j = 0, min(stops.n_left, stops.n_right)
    while i < j:
        h = (i + j) // 2
        if stops.left(h) < stops.right(h):
            i = h + 1
        else:
            j = h
    t, m = i, len(seg)
    cut = min(stops.left(t) if t < stops.n_left else m, stops.right(t - 1) if t > 0 else m)
    if cut >= m:
        return None  # an unguarded scan would run off the segment: not a state introsort reaches
    li = np.flatnonzero(stops.le[:cut])  # the first t left stops: all of them before the cut
    start = stops.right(t - 1) if t else m
    ri = np.flatnonzero(stops.ge[start:])[::-1] + start  # the first t right stops, from the end
    if len(li) != t or len(ri) != t:
        raise AssertionError("introsort replay: inconsistent stop counts")
    both = k > lo + 1 + cut  # the search goes on right of the cut: both sides must be right
    for x in (seg, segp):
        moved = x[li]
        x[li] = x[ri]
        if both:
            x[ri] = moved
    return lo + 1 + cut


class _Stops:
    """The i-th True of two bool arrays (from the left in ``le``, from the right in ``ge``), found through
    per-block counts instead of full index lists."""

    BLOCK = 1 << 15

    def __init__(self, le, ge):
        import numpy as np

        self.le, self.ge, self.np = le, ge, np
        self.cle, self.cge = self._prefix(le), self._prefix(ge)
        self.n_left, self.n_right = int(self.cle[-1]), int(self.cge[-1])

    def _prefix(self, mask):
        np, b = self.np, self.BLOCK
        full = len(mask) // b * b
        counts = np.count_nonzero(mask[:full].reshape(-1, b), axis=1)
        return np.cumsum(np.append(counts, np.count_nonzero(mask[full:])))

    def _nth(self, mask, prefix, i: int) -> int:
        block = int(self.np.searchsorted(prefix, i, side="right"))
        before = int(prefix[block - 1]) if block else 0
        start = block * self.BLOCK
        return start + int(self.np.flatnonzero(mask[start:start + self.BLOCK])[i - before])

    def left(self, i: int) -> int:
        return self._nth(self.le, self.cle, i)

    def right(self, i: int) -> int:
        return self._nth(self.ge, self.cge, self.n_right - 1 - i)


def magnitude_keys(tensor):
    """Integer keys ordered exactly like ``tensor.abs().float()`` (what mergekit sorts), or None.

    For IEEE floats without their sign bit, the bit pattern read as an integer orders like the
    magnitude, and equal patterns are equal magnitudes (+0 and -0 both become 0); bfloat16 and
    float16 convert to float32 exactly, so their 16-bit patterns order like mergekit's float32
    values. None for NaNs (their payloads would not compare equal) and for other dtypes.
    """
    import torch

    bits = {torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80), torch.float16: (torch.int16, 0x7FFF, 0x7C00),
            torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000)}.get(tensor.dtype)
    if bits is None or tensor.device.type != "cpu":
        return None
    int_dtype, magnitude, infinity = bits
    keys = tensor.reshape(-1).view(int_dtype) & magnitude
    if keys.numel() and int(keys.max()) > infinity:
        return None
    return keys


def magnitude_keys_numpy(values, bf16: bool):
    """``magnitude_keys`` of a float32 numpy array: int32 keys, or int16 ones where every value is a bfloat16
    (``bf16``: its upper 16 bits, half the bytes to move), or None for NaNs."""
    import numpy as np

    bits = values.reshape(-1).view(np.uint32)
    if bf16:
        keys, infinity = ((bits >> 16) & 0x7FFF).astype(np.int16), 0x7F80
    else:
        keys, infinity = (bits & 0x7FFFFFFF).view(np.int32), 0x7F800000
    return None if keys.size and int(keys.max()) > infinity else keys
