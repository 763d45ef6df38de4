"""The inner loop of `surgery diff`: read tensors, reduce their deltas to sums, in bounded memory.

Tensors are read with plain file reads into fresh buffers (one tensor per checkpoint, plus the next
one read ahead on a second thread), then reduced in chunks of rows small enough to stay in the CPU
cache, so each float32 delta is formed and consumed chunk by chunk and never exists whole.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass


CHUNK = 1 << 17  # float32 entries per chunk: 512 KB, so a chunk's buffers stay in cache (measured best)


# ---------------------------------------------------------------------------- reading

def read_ahead(names, base, cks):
    """Yield (name, base tensor, {expert: tensor}) in stored dtypes, reading the next name meanwhile."""
    from concurrent.futures import ThreadPoolExecutor

    readers = {n: Reader(ck) for n, ck in [("", base)] + list(cks.items())}

    def load(i):
        name, slot = names[i], i % 2
        return name, readers[""].read(name, slot), {en: readers[en].read(name, slot) for en in cks}

    # Two buffer slots per checkpoint: item i is read into slot i % 2 while item i - 1 (the other slot)
    # is being reduced; item i + 1 reuses this slot only once the consumer has asked for it, i.e. is
    # done with item i - 1. Callers must not keep the yielded tensors past the next iteration.
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(load, 0) if names else None
            for i in range(len(names)):
                item = pending.result()
                pending = pool.submit(load, i + 1) if i + 1 < len(names) else None
                yield item
                item = None
    finally:
        for r in readers.values():
            r.close()


class Reader:
    """Reads one tensor at a time into reused buffers, through Checkpoint.get's positioned reads.

    ``read(name, slot)`` reuses the buffer of ``slot`` (grown to the largest tensor seen), so the
    data is valid until that slot is read again; ``slot=None`` returns a fresh buffer. Inputs that
    are not files (adapters: base + ΔW) are computed by their own ``get``.
    """

    def __init__(self, ck):
        self.ck = ck
        self.slots: dict = {}

    def read(self, name, slot=None):
        import torch

        if name not in getattr(self.ck, "weight_map", {}):
            return self.ck.get(name).clone()
        if slot is None:
            return self.ck.get(name)
        size = self.ck.meta[name].nbytes
        buf = self.slots.get(slot)
        if buf is None or buf.numel() < size:
            buf = self.slots[slot] = torch.empty(size, dtype=torch.uint8)
        return self.ck.get(name, out=buf)

    def close(self):
        self.ck.close()


# ---------------------------------------------------------------------------- reducing

@dataclass
class Sums:
    """Per expert: Σ Δ², Σ W_base·Δ, Σ|Δ|, max|Δ|, #|Δ|>tol, and Σ Δ² along ``axis`` (or None)."""

    sq: float = 0.0
    bd: float = 0.0
    abs_sum: float = 0.0
    max_abs: float = 0.0
    changed: int = 0
    vec: object = None


class Scratch:
    """Reusable float32 buffers: fresh allocations of this size cost page faults on every chunk."""

    def __init__(self):
        self.bufs: dict = {}

    def get(self, key, n: int):
        import torch

        buf = self.bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self.bufs[key] = torch.empty(max(n, CHUNK), dtype=torch.float32)
        return buf[:n]


def tensor_sums(b_raw, e_raws: dict, tol: float, axis: int | None, pair_keys, scratch: Scratch | None = None):
    """Reduce one tensor: (Σ W_base², {expert: Sums}, {(a, b): [Σ Δa·Δb, #Δa·Δb>0, #Δa·Δb≠0]}).

    ``axis`` (0 or 1; for 1-D tensors every entry is its own slot) asks for squared sums per row or per
    column, the raw material of neuron and head scores. Expert buffers may be changed in place.
    Counting uses sign sums (#x>0 = (Σsign x + Σ|sign x|)/2), exact in float32 for chunks < 2^24.
    """
    import torch

    scratch = scratch or Scratch()
    one_d = b_raw.dim() <= 1
    B = b_raw.reshape(1, -1) if one_d else b_raw.reshape(b_raw.shape[0], -1)
    E = {n: (t.reshape(1, -1) if one_d else t.reshape(t.shape[0], -1)) for n, t in e_raws.items()}
    if one_d and axis is not None:
        axis = 1
    R, C = B.shape
    step = max(1, CHUNK // max(C, 1))
    out = {n: Sums(vec=None if axis is None else torch.zeros(R if axis == 0 else C, dtype=torch.float64)) for n in E}
    pairs = {p: [0.0, 0, 0] for p in pair_keys}
    bsq = 0.0
    for r0 in range(0, R, step):
        rows = min(step, R - r0)
        n = rows * C
        b = B[r0:r0 + rows]
        if b.dtype != torch.float32:
            b = scratch.get("b", n).view(rows, C).copy_(b)
        bf = b.reshape(-1)
        bsq += float(torch.dot(bf, bf))
        t1, t2 = scratch.get("t1", n), scratch.get("t2", n)
        ds = {}
        for name, e in E.items():
            s = out[name]
            d = e[r0:r0 + rows]
            d = d.sub_(b) if d.dtype == torch.float32 else scratch.get(("e", name), n).view(rows, C).copy_(d).sub_(b)
            df = d.reshape(-1)
            if axis is None:
                s.sq += float(torch.dot(df, df))
            else:
                v = torch.mul(df, df, out=t1).view(rows, C).sum(1 - axis).double()
                if axis == 0:
                    s.vec[r0:r0 + rows] += v
                else:
                    s.vec += v
                s.sq += float(v.sum())
            s.bd += float(torch.dot(bf, df))
            a = torch.abs(df, out=t1)
            s.abs_sum += float(a.sum())
            s.max_abs = max(s.max_abs, float(torch.amax(a))) if n else s.max_abs
            if tol:
                s.changed += _count_positive(torch.sub(a, tol, out=t2), t2)
            else:  # a >= 0, so sign(a) is 0 or 1
                s.changed += int(round(float(torch.sign(a, out=t2).sum())))
            ds[name] = df
        for (x, y), acc in pairs.items():
            prod = torch.mul(ds[x], ds[y], out=t1)
            acc[0] += float(prod.sum())
            sg = torch.sign(prod, out=t2)
            total = float(sg.sum())
            nonzero = float(torch.dot(sg, sg))
            acc[1] += int(round((nonzero + total) / 2))
            acc[2] += int(round(nonzero))
    return bsq, out, pairs


def _count_positive(x, buf) -> int:
    """#entries > 0 of x (x may be buf itself)."""
    import torch

    sg = torch.sign(x, out=buf)
    total = float(sg.sum())
    return int(round((float(sg.abs_().sum()) + total) / 2))


# ---------------------------------------------------------------------------- neurons and heads

def vec_axis(info, layout, heads) -> tuple[int | None, str | None]:
    """Which axis of this tensor carries neurons or heads, and which of the two."""
    if info.layer is None:
        return None, None
    bias = info.name.endswith("bias")
    if info.neuron_axis is not None:
        return info.neuron_axis, "neurons"
    if heads is None or info.group != "attn":
        return None, None
    out_axis, in_axis = (1, 0) if layout.transposed else (0, 1)
    if info.kind == "attn_o":
        return (None, None) if bias else (in_axis, "heads")
    if info.kind in ("attn_q", "attn_k", "attn_v", "attn_qkv"):
        return (0 if bias else out_axis), "heads"
    return None, None


def neuron_vec(vec, info):
    """Squared sums per neuron; fused gate_up holds neuron j in rows j and I + j."""
    return vec.view(2, -1).sum(0) if info.kind == "mlp_gate_up" else vec


def head_vec(vec, info, h):
    """Squared delta per query head: q_h + o_h + (k_g + v_g)/G, with g the kv head of h and G = heads per kv head.

    ``h``: the model's ``core.layout.Heads``; the kv heads are read from the tensor's size. Summed over heads this
    equals the squared delta of q, k, v and o together. None: layout mismatch.
    """
    import torch

    nq, kind = h.n_heads * h.head_dim, info.kind
    if kind in ("attn_q", "attn_o"):
        return vec.view(h.n_heads, -1).sum(1) if vec.numel() == nq else _bad(info, vec)
    if kind not in ("attn_k", "attn_v", "attn_qkv"):
        return None
    n_kv = h.kv_heads(kind, vec.numel())
    if n_kv is None:
        return _bad(info, vec)
    G = h.n_heads // n_kv
    if kind in ("attn_k", "attn_v"):
        return (vec.view(n_kv, -1).sum(1) / G).repeat_interleave(G)
    if h.kv_groups:  # per kv head: G query heads, then k, then v
        blocks = vec.view(n_kv, G + 2, h.head_dim).sum(2)
        q, kv = blocks[:, :G].reshape(-1), blocks[:, G:].sum(1)
    else:
        q, k, v = torch.split(vec, [nq, n_kv * h.head_dim, n_kv * h.head_dim])
        q, kv = q.view(h.n_heads, -1).sum(1), (k + v).view(n_kv, -1).sum(1)
    return q + (kv / G).repeat_interleave(G)


def _bad(info, vec):
    warnings.warn(f"{info.name}: {vec.numel()} rows don't match the config's attention head layout; "
                  "left out of the head scores", stacklevel=3)
    return None
