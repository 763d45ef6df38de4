"""The exact TIES top-k (``topk``) of an array read block by block: memory bounded by ``budget`` entries,
not by the array.

``topk.top_k_mask_numpy`` replays libstdc++'s introsort on the path of position k, on the whole key array
and a permutation of it (6-8 bytes per entry: 3-4 GB for a 8B model's embedding). Here each partition on that path
is computed from streams instead of arrays, until the segment holding position k has at most ``budget`` entries;
that segment is then read into memory and the compiled replay finishes it (with the depth limit left).

A Hoare partition of a segment S (pivot p at position 0 after the median-of-three swap) swaps its t-th entry
<= p from the left ("le stop" L_t) with its t-th entry >= p from the right ("ge stop" R_t) while L_t < R_t. The
result is a function of S alone: on the left of the cut, the le stops read R_0, R_1, ... (the ge stops from the
right); on the right, the T swapped ge stops read the le stops. So each side is a view of S that two streams of S
(one forward, one backward) produce, and a view of a view is streamed the same way. Per-block counts of both kinds
of stops (one pass per partition) let a stream start anywhere: the number of stops before a position says which
stop of the other stream fills it. Every pass reads about the whole array once, whatever the depth.

Views yield chunks ``(pos, keys, idx)``: keys and original indices at positions pos, pos+1, ... (``fwd``) or pos,
pos-1, ... (``bwd``). Keys are integers (``topk.magnitude_keys``): equal keys are equal magnitudes.
"""

from __future__ import annotations

import numpy as np

THRESHOLD = 16  # libstdc++ _S_threshold
COUNT_BLOCK = 1 << 16  # positions per block of the stop counts


def select(source, k: int, budget: int, tie: int, on_kept):
    """Replay introsort's selection of the first ``k`` of ``source`` (a ``Source``) in streamed partitions.
    ``on_kept(idx)`` receives the original indices of the kept entries whose key is ``tie`` (the k-th largest:
    every larger key is kept, every smaller one dropped), a chunk at a time. Returns False where the replay is
    not exact (introsort would heapsort, or a scan would leave its segment), else True."""
    from surgery.merge.topk import top_k_mask_numpy

    view, n = source, source.n
    depth = 2 * (n.bit_length() - 1) if n else 0
    while view.n > max(budget, THRESHOLD) and 0 < k < view.n:
        if depth == 0:
            return False
        depth -= 1
        split = Split(Swap(view, 0, _median(view)))
        if split.cut is None:
            return False
        if k <= split.cut:
            view = Side(split, left=True)
        else:
            for _, keys, idx in Side(split, left=True).fwd(0):
                on_kept(idx[keys == tie])
            view, k = Side(split, left=False), k - split.cut
    if k <= 0:
        return True
    if k >= view.n:
        for _, keys, idx in view.fwd(0):
            on_kept(idx[keys == tie])
        return True
    keys = np.empty(view.n, np.int16 if source.narrow else np.int32)
    idx = np.empty(view.n, np.int32 if source.n < 1 << 31 else np.int64)
    for pos, k_chunk, i_chunk in view.fwd(0):
        keys[pos:pos + k_chunk.size] = k_chunk
        idx[pos:pos + k_chunk.size] = i_chunk
    ties = keys == tie
    mask = top_k_mask_numpy(keys, k, depth)  # reorders keys, not the mask
    if mask is None:
        return False
    mask &= ties
    on_kept(idx[mask])
    return True


class Source:
    """Positions [0, n) whose keys ``keys_of(start, stop)`` computes (a fresh int32 array), ``block`` at a time;
    ``narrow``: every key fits in int16 (the magnitudes of 16-bit floats), half the bytes for the last segment."""

    def __init__(self, n: int, keys_of, block: int, narrow: bool = False):
        self.n, self.keys_of, self.block, self.narrow = n, keys_of, max(1, block), narrow
        self._cache: dict = {}

    def _keys(self, s: int):
        keys = self._cache.get(s)
        if keys is None:
            keys = self.keys_of(s, min(self.n, s + self.block))
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[s] = keys
        return keys

    # Chunks start small and double up to the block: a stream that starts a view's stream (a lookup, a count
    # block) reads a few entries at every level, a pass reads whole blocks.
    FIRST = 1 << 10

    def fwd(self, a: int):
        b, size = self.block, self.FIRST
        while a < self.n:
            s = a // b * b
            end = min(self.n, s + b, a + size)
            yield a, self._keys(s)[a - s:end - s].copy(), np.arange(a, end, dtype=np.int64)
            a, size = end, min(2 * size, b)

    def bwd(self, end: int):
        b, size = self.block, self.FIRST
        while end > 0:
            s = (end - 1) // b * b
            start = max(s, end - size)
            yield end - 1, self._keys(s)[start - s:end - s][::-1].copy(), np.arange(end - 1, start - 1, -1,
                                                                                  dtype=np.int64)
            end, size = start, min(2 * size, b)


def point(view, x: int):
    """(key, index) at position x of a view."""
    _, keys, idx = next(iter(view.fwd(x)))
    return keys[0], idx[0]


def _median(view) -> int:
    """std::__move_median_to_first's choice among positions 1, n/2, n-1, with torch's comparator x > y."""
    a, b, c = 1, view.n // 2, view.n - 1
    va, vb, vc = (point(view, x)[0] for x in (a, b, c))
    if va > vb:
        return b if vb > vc else c if va > vc else a
    return a if va > vc else c if vb > vc else b


class Swap:
    """A view with positions i and j swapped (the median moved to the front)."""

    def __init__(self, parent, i: int, j: int):
        self.parent, self.n = parent, parent.n
        self.at = {i: point(parent, j), j: point(parent, i)}

    def _patched(self, chunks, step: int):
        for pos, keys, idx in chunks:
            for x, (key, ix) in self.at.items():
                o = (x - pos) * step
                if 0 <= o < keys.size:
                    keys[o], idx[o] = key, ix
            yield pos, keys, idx

    def fwd(self, a: int):
        return self._patched(self.parent.fwd(a), 1)

    def bwd(self, end: int):
        return self._patched(self.parent.bwd(end), -1)


class Split:
    """The Hoare partition of a view around the key at its position 0: the cut (None: a scan would run off the
    segment), the number of swaps T, and per-block counts of both kinds of stops (positions 1 on)."""

    def __init__(self, view):
        self.view, self.n = view, view.n
        self.p = point(view, 0)[0]
        nb = -(-self.n // COUNT_BLOCK)
        le, ge = np.zeros(nb, np.int64), np.zeros(nb, np.int64)
        for pos, keys, _ in view.fwd(0):
            first = pos // COUNT_BLOCK  # the chunk's pieces in each count block
            cuts = np.arange(first * COUNT_BLOCK, pos + keys.size, COUNT_BLOCK)
            cuts[0] = pos
            cuts -= pos
            for counts, stops in ((le, keys <= self.p), (ge, keys >= self.p)):
                if pos == 0:
                    stops[0] = False
                counts[first:first + cuts.size] += np.add.reduceat(stops.view(np.uint8), cuts, dtype=np.int64)
        self.cum = {"le": np.cumsum(le), "ge": np.cumsum(ge)}  # stops in blocks [0, b]
        self.total = {kind: int(c[-1]) if nb else 0 for kind, c in self.cum.items()}
        self._blocks: dict = {}
        self.swaps, self.cut = self._cross()

    def _cross(self):
        """T = the first t with L_t >= R_t (a missing L_t is past the end, a missing R_t is position 0), and the
        cut where the left scan stops: min(L_T, R_{T-1})."""
        g_le, g_ge = self.total["le"], self.total["ge"]
        lo, hi = 0, min(g_le, g_ge)
        while lo < hi:
            t = (lo + hi) // 2
            if self.stop_at("le", t) >= self.stop_at("ge", g_ge - 1 - t):
                hi = t
            else:
                lo = t + 1
        cut = min(self.stop_at("le", lo) if lo < g_le else self.n, self.stop_at("ge", g_ge - lo) if lo else self.n)
        return lo, (cut if cut < self.n else None)

    def _block(self, b: int) -> dict:
        """Positions and entries of both kinds of stops in count block b."""
        if b not in self._blocks:
            start, end = b * COUNT_BLOCK, min(self.n, (b + 1) * COUNT_BLOCK)
            parts = []
            for pos, keys, idx in self.view.fwd(start):
                parts.append((pos, keys[:end - pos], idx[:end - pos]))
                if pos + keys.size >= end:
                    break
            keys = np.concatenate([p[1] for p in parts])
            positions = np.arange(start, end)
            out = {}
            for kind, stops in (("le", keys <= self.p), ("ge", keys >= self.p)):
                stops[positions == 0] = False
                out[kind] = positions[stops]
            if len(self._blocks) >= 8:
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[b] = out
        return self._blocks[b]

    def stop_at(self, kind: str, j: int) -> int:
        """The position of stop j (counted from the left) of this kind."""
        b = int(np.searchsorted(self.cum[kind], j, side="right"))
        before = int(self.cum[kind][b - 1]) if b else 0
        return int(self._block(b)[kind][j - before])

    def before(self, kind: str, x: int) -> int:
        """The number of stops of this kind at positions [1, x)."""
        b = x // COUNT_BLOCK
        count = int(self.cum[kind][b - 1]) if b else 0
        start = b * COUNT_BLOCK
        if start < x:
            count += int(np.searchsorted(self._block(b)[kind], x))
        return count

    def stops(self, kind: str, j: int, forward: bool):
        """A ``Taker`` of the stops of this kind from stop j on, rightwards (``forward``) or leftwards."""
        total = self.total[kind]
        if not 0 <= j < total:
            return Taker(iter(()))
        b = int(np.searchsorted(self.cum[kind], j, side="right"))
        before = int(self.cum[kind][b - 1]) if b else 0
        if forward:
            chunks, skip = self.view.fwd(b * COUNT_BLOCK), j - before
        else:
            chunks, skip = self.view.bwd(min(self.n, (b + 1) * COUNT_BLOCK)), int(self.cum[kind][b]) - 1 - j
        return Taker(self._filtered(chunks, kind, forward), skip)

    def _filtered(self, chunks, kind: str, forward: bool):
        p = self.p
        for pos, keys, idx in chunks:
            stops = keys <= p if kind == "le" else keys >= p
            if pos == 0 or (not forward and pos - keys.size < 0):
                stops[0 if forward else pos] = False  # position 0 holds the pivot: not a stop
            yield keys[stops], idx[stops]


class Taker:
    """Entries from a stream of (keys, idx) chunks, taken m at a time, after skipping ``skip``."""

    def __init__(self, chunks, skip: int = 0):
        self.chunks, self.keys, self.idx = chunks, np.empty(0, np.int32), np.empty(0, np.int64)
        self.skip = skip

    def take(self, m: int):
        keys, idx = [self.keys], [self.idx]
        have = self.keys.size
        while have < m + self.skip:
            k, i = next(self.chunks)  # StopIteration here would be a bookkeeping error
            keys.append(k)
            idx.append(i)
            have += k.size
        keys, idx = np.concatenate(keys)[self.skip:], np.concatenate(idx)[self.skip:]
        self.skip = 0
        self.keys, self.idx = keys[m:], idx[m:]
        return keys[:m], idx[:m]


class Side:
    """One side of a ``Split`` after its swaps: positions [0, cut) (``left``) or [cut, n)."""

    def __init__(self, split: Split, left: bool):
        self.split, self.left = split, left
        self.n = split.cut if left else split.n - split.cut

    def fwd(self, a: int):
        s, c, t = self.split, self.split.cut, self.split.swaps
        if self.left:  # le stops from a on read R_t0, R_t0+1, ...
            t0 = s.before("le", a) if a > 1 else 0
            filler = s.stops("ge", s.total["ge"] - 1 - t0, forward=False)
            return _replace(s.view.fwd(a), c, 1, "le", s.p, 0, t - t0, filler, 0)
        u = s.total["ge"] - s.before("ge", c + a)  # ge stops at positions >= c + a; the last T are swapped
        swapped = min(u, t)
        filler = s.stops("le", swapped - 1, forward=False)  # R_(swapped-1) reads L_(swapped-1), then down
        return _replace(s.view.fwd(c + a), s.n, 1, "ge", s.p, u - swapped, swapped, filler, c)

    def bwd(self, end: int):
        s, c, t = self.split, self.split.cut, self.split.swaps
        if self.left:  # le stops before end read R_(t_hi-1), R_(t_hi-2), ...: ge stops rightwards
            t_hi = s.before("le", end)
            filler = s.stops("ge", s.total["ge"] - t_hi, forward=True)
            return _replace(s.view.bwd(end), -1, -1, "le", s.p, 0, t_hi, filler, 0)
        u = s.total["ge"] - s.before("ge", c + end)  # ge stops right of the range: R_0 .. R_(u-1)
        filler = s.stops("le", u, forward=True)
        return _replace(s.view.bwd(c + end), c - 1, -1, "ge", s.p, 0, max(0, t - u), filler, c)


def _replace(chunks, stop: int, step: int, kind: str, p, skip: int, count: int, filler: Taker, shift: int):
    """The chunks up to position ``stop`` (exclusive, in the direction ``step``), their stops of ``kind`` (position
    0 excepted) after the first ``skip`` replaced by the next ``count`` entries of ``filler``; positions
    shifted by ``-shift``."""
    for pos, keys, idx in chunks:
        size = (stop - pos) * step
        if size <= 0:
            return
        keys, idx = keys[:size], idx[:size]
        if count > 0:
            stops = np.flatnonzero(keys <= p if kind == "le" else keys >= p)
            positions = pos + step * stops
            stops = stops[positions != 0]
            if skip:
                dropped = min(skip, stops.size)
                stops, skip = stops[dropped:], skip - dropped
            stops = stops[:count]
            if stops.size:
                keys[stops], idx[stops] = filler.take(stops.size)
                count -= stops.size
        yield pos - shift, keys, idx
