"""TIES on huge tensors in bounded memory (surgery/merge/ties_stream.py, topk_stream.py): the same bytes as mergekit
and as the whole-array kernel, with blocks, count blocks and the in-memory budget forced small so that small
tensors go through many streamed partitions."""

import numpy as np
import pytest
import torch
from helpers import load, raw_bytes
from test_host_backends import (
    TORCH,
    hard_values,
    merge_recipe,
    mergekit,
    numpy_bits,
    params,
    same,
    supports,
)

import surgery
from surgery.core import host_math
from surgery.merge import native, ties_stream, topk_stream
from surgery.merge.numeric import merge_dtype
from surgery.merge.topk import top_k_mask_numpy


@pytest.fixture
def small(monkeypatch):
    """Stream every tensor, in tiny blocks, down to a tiny last segment; count the streamed partitions."""
    if native.load("_elementwise") is None or native.load("_introsort") is None:
        pytest.fail("build the compiled kernels: python setup.py build_ext --inplace")
    monkeypatch.setattr(ties_stream, "MIN_ENTRIES", 0)
    monkeypatch.setattr(ties_stream, "BUDGET", 1000)
    monkeypatch.setattr(ties_stream, "BLOCK_BYTES", 4 * 512)
    monkeypatch.setattr(topk_stream, "COUNT_BLOCK", 700)
    splits = []
    split_init = topk_stream.Split.__init__
    monkeypatch.setattr(topk_stream.Split, "__init__", lambda self, v: splits.append(v.n) or split_init(self, v))
    return splits


def argsort_mask(w: np.ndarray, k: int) -> np.ndarray:
    """What mergekit keeps: the first k of torch's unstable descending argsort."""
    mask = torch.zeros(w.size, dtype=torch.bool)
    mask[torch.argsort(torch.from_numpy(w.astype(np.float32)), descending=True)[:k]] = True
    return mask.numpy()


def streamed_mask(w: np.ndarray, k: int, budget: int, block: int):
    tie = int(np.sort(w)[::-1][k - 1])
    kept = w > tie
    got = []
    ok = topk_stream.select(topk_stream.Source(w.size, lambda a, b: w[a:b].copy(), block, narrow=True), k, budget,
                            tie, got.append)
    if got:
        idx = np.concatenate(got)
        assert np.unique(idx).size == idx.size and (w[idx] == tie).all()
        kept[idx] = True
    return kept if ok else None


def test_streamed_selection_is_torch_argsort(small):
    g = np.random.default_rng(0)
    decided, depths = 0, []
    for trial in range(12):
        n = int(g.integers(2000, 12000))
        if trial % 3 == 0:  # few distinct values: ties everywhere
            w = g.integers(0, 4, n)
        elif trial % 3 == 1:  # |bf16 delta| keys as TIES sees them
            x = torch.from_numpy(g.standard_normal(n).astype(np.float32)) * 0.002
            w = x.bfloat16().view(torch.int16).numpy() & 0x7FFF
        else:
            w = g.integers(0, 1000, n)
        w = w.astype(np.int32)
        k = int(g.integers(1, n + 1))
        want = argsort_mask(w, k)
        before = len(small)
        got = streamed_mask(w, k, budget=int(g.choice([400, 1000])), block=int(g.choice([300, 1024])))
        assert got is not None and np.array_equal(got, want), (trial, n, k)
        depths.append(len(small) - before)
        tie = w[want].min()
        decided += int(((w == tie) & ~want).any() and ((w == tie) & want).any())
    assert decided > 6  # ties split at the threshold: the sort's order decided them
    assert max(depths) >= 6 and sum(d >= 3 for d in depths) > 6  # streamed partitions, several levels deep


def test_streamed_selection_agrees_with_the_whole_array_replay_on_organ_pipes(small):
    # sorted runs up and down are median-of-three's bad cases: the streamed partitions pass their depth limit on
    # to the in-memory replay, which must stop (heapsort: None) exactly where the whole-array replay stops
    n = 4000
    w = np.concatenate([np.arange(n // 2), np.arange(n // 2)[::-1]]).astype(np.int32) % 7
    for k in (1, 100, n // 2, n - 1):
        whole = top_k_mask_numpy(w.copy(), k)
        got = streamed_mask(w, k, budget=50, block=256)
        assert (got is None) == (whole is None)
        if got is not None:
            assert np.array_equal(got, whole) and np.array_equal(got, argsort_mask(w, k))


def ties_bits(tensors, p, stored, rows_per_block: int = 13):
    """The streamed TIES: the selection passes over row blocks, then the merge block by block."""
    raws = [t.contiguous().view(torch.uint8).numpy().reshape(t.shape[0], -1) for t in tensors]
    kernel = ties_stream.prepare(lambda i, rows: raws[i][rows[0]:rows[1]].reshape(-1).copy(), p, stored,
                                 tuple(tensors[0].shape))
    assert kernel is not None
    dtype = merge_dtype(p, stored)
    out = np.empty(tensors[0].shape, dtype=host_math.HOST_DTYPES[dtype])
    for a in range(0, out.shape[0], rows_per_block):
        b = min(out.shape[0], a + rows_per_block)
        arrays = [host_math.to_float32(r[a:b].reshape(-1).copy(), s).reshape(b - a, -1) for r, s in zip(raws, stored)]
        with np.errstate(all="ignore"):
            host_math.from_float32(kernel(arrays, (a, b)), dtype, out[a:b], exact=True)
    return out.tobytes()


CASES = [  # densities per model, shared parameters
    ([0.5, 0.5], {}), ([0.3, 0.9, 0.1], {"lambda": 0.7}), ([0.0, 1.0], {}), ([1e-6, 0.999999], {"normalize": False}),
    ([0.25, 0.5, 0.7, 0.05], {}),
]


@pytest.mark.parametrize("stored", [["BF16"] * 5, ["F32"] * 5, ["F16", "BF16", "BF16", "F16", "BF16"]])
@pytest.mark.parametrize("densities, shared", CASES)
def test_streamed_ties_is_bitwise_mergekit(stored, densities, shared, small, monkeypatch):
    ids = [f"m{i}" for i in range(len(densities))] + ["base"]
    stored = stored[:len(densities)] + [stored[-1]]
    g = torch.Generator().manual_seed(len(densities))
    # |base| in [0.25, 0.5) (a bfloat16 step of 2**-9) but a few hard values; experts near it: few distinct delta
    # magnitudes (ties at every threshold), both signs
    base = (torch.rand(211 * 37, generator=g) * 0.25 + 0.25) * (torch.randint(0, 2, (211 * 37,), generator=g) * 2 - 1)
    base[:500] = hard_values(500, seed=31, dtype="BF16").float().clamp(-100, 100)
    base = base.reshape(211, 37)
    tensors = [(base + torch.randint(-4, 5, base.shape, generator=g).float() * 2 ** -9).to(TORCH[s])
               for s in stored[:-1]] + [base.to(TORCH[stored[-1]])]
    p = params("ties", ids, [0.6, -0.3, 1.1, 0.5][:len(densities)] + [None], base="base", **shared)
    for i, d in zip(ids, densities):
        p["per_input"][i]["density"] = d
    assert supports(p, stored)
    got = ties_bits(tensors, p, stored)
    assert got == numpy_bits(tensors, p, stored)  # the whole-array kernel
    assert same(got, mergekit(tensors, p, monkeypatch))
    if any(0.01 < d < 0.99 for d in densities):
        assert len(small) >= 2  # the selections streamed partitions


def test_selection_needs_no_replay_where_the_ties_do_not_matter(small):
    n = 5000
    w = np.repeat(np.arange(1, 51, dtype=np.int32), 100)  # 100 ties per key
    for density, kind in ((0.5, "ge"), (0.503, "tie"), (0.99999, "tie"), (0.98, "ge")):  # "ge": all ties kept
        sel = ties_stream.select_model(lambda a, b: w[a:b].copy(), n, 256, density, "BF16")
        assert sel[0] == kind
        if kind == "tie":
            keep = int(density * n)
            bits = np.unpackbits(sel[2], bitorder="little")[:n].astype(bool)
            assert np.array_equal((w > sel[1]) | bits, argsort_mask(w, keep))
    zero = np.where(np.arange(n) < 4000, 0, 7).astype(np.int32)  # T = 0: a dropped zero is a kept zero
    assert ties_stream.select_model(lambda a, b: zero[a:b].copy(), n, 256, 0.5, "BF16") == ("ge", 0)
    nan = w.copy()
    nan[7] = 0x7FC0
    assert ties_stream.select_model(lambda a, b: nan[a:b].copy(), n, 256, 0.5, "BF16") is None


def test_a_run_writes_the_same_bytes_streamed(family, tmp_path, monkeypatch, small):
    r = merge_recipe(family, "ties", parameters={"density": 0.4})
    surgery.run(r, tmp_path / "streamed")
    assert small  # the run streamed
    monkeypatch.setattr(ties_stream, "MIN_ENTRIES", 1 << 40)
    surgery.run(r, tmp_path / "whole")
    monkeypatch.setenv("SURGERY_BACKEND", "mergekit")
    surgery.run(r, tmp_path / "mergekit")
    got, whole, want = load(tmp_path / "streamed"), load(tmp_path / "whole"), load(tmp_path / "mergekit")
    assert got.keys() == want.keys()
    assert all(raw_bytes(got[n]) == raw_bytes(whole[n]) == raw_bytes(want[n]) for n in want)


@pytest.mark.slow
def test_memory_is_bounded_by_blocks_not_by_the_tensor(tmp_path, monkeypatch):
    import tracemalloc

    from safetensors.torch import save_file

    from surgery.pipeline import build_plan

    rows, cols = 8192, 4096  # 32M entries: 64 MB per bfloat16 input, 128 MB of float32
    base = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    recipe = {"merge_method": "ties", "base_model": str(tmp_path / "base"), "dtype": "bfloat16", "models": []}
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        step = torch.randint(-3, 4, base.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
        x = base if name == "base" else (base.float() + step.float() * 2 ** -14).bfloat16()  # few distinct deltas
        (tmp_path / name).mkdir()
        save_file({"model.embed_tokens.weight": x}, str(tmp_path / name / "model.safetensors"))
        if name != "base":
            recipe["models"].append({"model": str(tmp_path / name), "parameters": {"weight": 0.5, "density": 0.5}})
    del base, x, step
    plan = build_plan(recipe)
    (entry,) = plan.entries
    monkeypatch.setattr(ties_stream, "BUDGET", 2 << 20)
    monkeypatch.setattr(ties_stream, "BLOCK_BYTES", 1 << 20)
    monkeypatch.setattr(host_math, "HOST_BLOCK_BYTES", 1 << 20)
    peak, out = {}, {}
    for how, least in (("streamed", 0), ("whole", 1 << 40)):
        monkeypatch.setattr(ties_stream, "MIN_ENTRIES", least)
        tracemalloc.start()  # numpy reports its buffers to tracemalloc
        out[how] = host_math.compute(entry, plan.inputs)
        peak[how] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert np.array_equal(out["streamed"], out["whole"])
    # measured: 0.40 GB against 1.41 GB (the output is 64 MB, the last segment ~25 MB; whole: float32 copies of
    # every input and delta, the replay's keys and permutation)
    assert peak["streamed"] < 0.4 * peak["whole"] and peak["whole"] > 1 << 30, peak
