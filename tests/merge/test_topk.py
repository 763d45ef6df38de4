"""The exact TIES selection without sorting equals mergekit's argsort (ties included), and its fallbacks.

Every exactness test runs twice: on the compiled kernel (``_introsort.c``) and on the numpy replay
(``SURGERY_BACKEND=numpy``)."""

import functools
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from helpers import use_implementation

from surgery.merge import topk as introsort
from surgery.merge.topk import top_k_mask, top_k_mask_numpy


@pytest.fixture(params=["native", "numpy"])
def impl(request, monkeypatch):
    """Run the test on one implementation, and check that it is the one that ran."""
    use_implementation(request.param, monkeypatch, "_introsort")
    replay, calls = introsort._replay, []
    monkeypatch.setattr(introsort, "_replay", lambda *a: calls.append(1) or replay(*a))
    yield request.param
    assert bool(calls) == (request.param == "numpy")


def argsort_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    """What mergekit keeps: the first k of torch's unstable descending argsort."""
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[torch.argsort(w, descending=True)[:k]] = True
    return mask


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    for trial in range(60):
        n = int(torch.randint(1, 3000, (1,), generator=g)) if trial < 50 else int(torch.randint(3000, 200_000, (1,),
                                                                                                 generator=g))
        kind = trial % 3
        if kind == 0:  # few distinct values: ties everywhere
            w = torch.randint(0, 4, (n,), generator=g).float()
        elif kind == 1:  # |bf16 delta| as TIES sees it
            w = (torch.randn(n, generator=g) * 0.002).bfloat16().float().abs()
        else:
            w = torch.randn(n, generator=g).abs()
        yield w, int(torch.randint(0, n + 1, (1,), generator=g))


@pytest.mark.parametrize("seed", [0, 1])
def test_same_entries_as_torch_argsort(seed, impl):
    ties_seen = 0
    for w, k in inputs(seed):
        got = top_k_mask(w, k)
        assert got is not None
        want = argsort_mask(w, k)
        assert torch.equal(got, want), (w.numel(), k)
        assert int(got.sum()) == k
        if 0 < k < w.numel():
            threshold = w[want].min()
            ties_seen += int(((w == threshold) & ~want).any())  # a tie was decided by the sort's order
    assert ties_seen > 20


def test_ties_are_not_decided_by_lowest_index(impl):
    # the point of replaying introsort: a stable rule (lowest index first) keeps different entries
    w = (torch.randn(100_000, generator=torch.Generator().manual_seed(3)) * 0.002).bfloat16().float().abs()
    k = w.numel() // 2
    stable = torch.zeros_like(argsort_mask(w, k))
    stable[torch.sort(w, descending=True, stable=True).indices[:k]] = True
    assert not torch.equal(stable, argsort_mask(w, k))
    assert torch.equal(top_k_mask(w, k), argsort_mask(w, k))


def test_overwrite_reorders_the_input_only_when_asked(impl):
    w = torch.rand(50_000)
    before = w.clone()
    top_k_mask(w, 1000)
    assert torch.equal(w, before)
    mask = top_k_mask(w, 1000, overwrite=True)
    assert torch.equal(mask, argsort_mask(before, 1000)) and not torch.equal(w, before)


def test_falls_back_where_replay_is_not_exact(impl):
    w = torch.rand(1000)
    w[5] = float("nan")
    assert top_k_mask(w, 10) is None
    assert top_k_mask_numpy(w.numpy().copy(), 10) is None
    assert top_k_mask(torch.rand(4, 4), 3) is None  # not 1-D
    assert torch.equal(top_k_mask(torch.rand(10), 0), torch.zeros(10, dtype=torch.bool))
    assert torch.equal(top_k_mask(torch.rand(10), 10), torch.ones(10, dtype=torch.bool))
    top_k_mask(torch.rand(1000), 10)  # (the fixture checks that a replay ran)


def test_numpy_replay_falls_back_where_a_scan_would_leave_the_segment(monkeypatch):
    monkeypatch.setenv("SURGERY_BACKEND", "numpy")
    monkeypatch.setattr(introsort, "_partition", lambda *a: None)
    assert top_k_mask(torch.rand(1000), 10) is None


def antiqsort(n: int, k: int) -> tuple[np.ndarray, int]:
    """McIlroy's adversary ("A killer adversary for quicksort") against introsort's partitions on the segment
    holding position k: values stay undecided ("gas", above all others) until compared, the pivot candidate is
    then frozen to the smallest value yet. Returns the values and the depth left (0: introsort heapsorts)."""
    gas, solid, candidate, val = n + 1, [0], [None], [n + 1] * n

    def gt(x, y):  # torch's descending comparator, deciding gas lazily
        if val[x] == gas and val[y] == gas:
            z = x if x == candidate[0] else y
            val[z], solid[0] = solid[0], solid[0] + 1
        candidate[0] = x if val[x] == gas else y if val[y] == gas else candidate[0]
        return val[x] > val[y]

    a, lo, hi, depth = list(range(n)), 0, n, 2 * (n.bit_length() - 1)
    while hi - lo > 16 and lo < k < hi and depth:
        depth -= 1
        x, b, c = lo + 1, lo + (hi - lo) // 2, hi - 1
        if gt(a[x], a[b]):
            m = b if gt(a[b], a[c]) else c if gt(a[x], a[c]) else x
        else:
            m = x if gt(a[x], a[c]) else c if gt(a[b], a[c]) else b
        a[lo], a[m] = a[m], a[lo]
        f, last = lo + 1, hi
        while True:
            while gt(a[f], a[lo]):
                f += 1
            last -= 1
            while gt(a[lo], a[last]):
                last -= 1
            if f >= last:
                break
            a[f], a[last] = a[last], a[f]
            f += 1
        lo, hi = (lo, f) if k <= f else (f, hi)
    return np.array(val, dtype=np.float32), depth


@pytest.mark.parametrize("n", [100, 3000])
def test_depth_limit_falls_back(n, impl):
    w, depth = antiqsort(n, n // 3)
    assert depth == 0  # introsort would heapsort: its order is not replayed
    assert top_k_mask(torch.from_numpy(w), n // 3) is None
    assert top_k_mask_numpy(w.astype(np.int32), n // 3) is None
    w[np.arange(0, n, 7)] = n + 1  # the adversary's input spoiled: introsort no longer runs out of depth
    assert torch.equal(top_k_mask(torch.from_numpy(w), n // 3), argsort_mask(torch.from_numpy(w), n // 3))


def test_magnitude_exact_equals_mergekit_magnitude(impl):
    from mergekit.sparsify import RescaleNorm, magnitude

    from surgery.merge.ties import magnitude_exact

    g = torch.Generator().manual_seed(4)
    delta = ((torch.randn(300, 200, generator=g) * 0.02).bfloat16() - (torch.randn(300, 200, generator=g) * 0.02)
             .bfloat16())
    for density, norm in ((0.5, None), (0.3, RescaleNorm.l1), (0.9, None), (1.0, None), (0.0, None)):
        got, want = magnitude_exact(delta, density, norm), magnitude(delta, density, norm)
        assert got.dtype == want.dtype and torch.equal(got.view(torch.int16), want.view(torch.int16)), density


def test_magnitude_exact_leaves_float32_input_alone(impl):
    from mergekit.sparsify import magnitude

    from surgery.merge.ties import magnitude_exact

    delta = torch.randn(200, 100, generator=torch.Generator().manual_seed(5))
    before = delta.clone()
    assert torch.equal(magnitude_exact(delta, 0.4), magnitude(before, 0.4))
    assert torch.equal(delta, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_integer_magnitude_keys_select_like_the_float_sort(dtype, impl):
    from surgery.merge.topk import magnitude_keys

    g = torch.Generator().manual_seed(6)
    for n in (1, 17, 1000, 40_000):
        delta = (torch.randn(n, generator=g) * 0.02).to(dtype) - (torch.randn(n, generator=g) * 0.02).to(dtype)
        delta[::5] = 0.0
        delta[1::7] = -0.0  # -0 and +0 are the same magnitude
        for k in (0, n // 3, n // 2, n):
            keys = magnitude_keys(delta)
            assert keys.dtype == (torch.int32 if dtype == torch.float32 else torch.int16)
            assert torch.equal(top_k_mask(keys, k, overwrite=True), argsort_mask(delta.abs().float(), k))
    nan = torch.tensor([1.0, float("nan"), 2.0], dtype=dtype)
    assert magnitude_keys(nan) is None
    assert magnitude_keys(torch.tensor([1.0, float("inf")], dtype=dtype)) is not None
    assert magnitude_keys(torch.ones(3, dtype=torch.float64)) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_numpy_magnitude_keys_are_the_torch_keys(dtype):
    """The compiled TIES holds bfloat16 values in float32 arrays: its keys are those of the stored tensor."""
    from surgery.merge.topk import magnitude_keys, magnitude_keys_numpy

    g = torch.Generator().manual_seed(7)
    delta = (torch.randn(5000, generator=g) * 0.02).to(dtype)
    delta[::5], delta[1::7], delta[3] = 0.0, -0.0, float("inf")
    keys = magnitude_keys_numpy(delta.float().numpy(), dtype == torch.bfloat16)
    assert keys.dtype.itemsize == delta.element_size() and keys.tolist() == magnitude_keys(delta).tolist()
    delta[9] = float("nan")
    assert magnitude_keys_numpy(delta.float().numpy(), dtype == torch.bfloat16) is None


@functools.lru_cache(maxsize=None)
def large_delta(dtype: torch.dtype) -> torch.Tensor:
    """3M bf16-like fine-tune deltas: heavy ties among the magnitudes (bfloat16 has 128 per octave)."""
    g = torch.Generator().manual_seed(7)
    n = 3_000_000
    delta = (torch.randn(n, generator=g) * 0.02).to(dtype) - (torch.randn(n, generator=g) * 0.02).to(dtype)
    delta[::11] = 0.0
    return delta


@functools.lru_cache(maxsize=None)
def large_expected(dtype: torch.dtype, k: int) -> torch.Tensor:
    return argsort_mask(large_delta(dtype).abs().float(), k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_large_inputs_keep_what_torch_argsort_keeps(dtype, impl):
    delta = large_delta(dtype)
    n = delta.numel()
    for k in (n // 2, n // 10):
        want = large_expected(dtype, k)
        keys = introsort.magnitude_keys(delta).numpy().copy()  # int16 for bfloat16, int32 for float32
        assert keys.dtype == (np.int16 if dtype == torch.bfloat16 else np.int32)
        assert np.array_equal(top_k_mask_numpy(keys, k), want.numpy()), (dtype, k)
        floats = delta.abs().float().numpy().copy()  # float32 keys
        assert np.array_equal(top_k_mask_numpy(floats, k), want.numpy()), (dtype, k)


def test_int16_keys_at_the_ends_of_their_range(impl):
    # the final insertion sort's order among the last <= 16 entries: -(-2**15) overflows int16
    g = torch.Generator().manual_seed(8)
    for _ in range(200):
        n = int(torch.randint(17, 400, (1,), generator=g))
        keys = torch.tensor([-2**15, -1, 0, 1, 2**15 - 1], dtype=torch.int16)[torch.randint(0, 5, (n,), generator=g)]
        k = int(torch.randint(1, n, (1,), generator=g))
        got = top_k_mask_numpy(keys.numpy().copy(), k)
        assert np.array_equal(got, argsort_mask(keys.float(), k).numpy()), (n, k)


def test_concurrent_calls_in_threads(impl):
    delta = large_delta(torch.bfloat16)[:1_000_000]
    want = argsort_mask(delta.abs().float(), 300_000).numpy()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: top_k_mask_numpy(introsort.magnitude_keys(delta).numpy().copy(), 300_000),
                                range(4)))
    assert all(np.array_equal(r, want) for r in results)


def test_top_k_mask_numpy_validates_its_input():
    with pytest.raises(ValueError, match="1-D"):
        top_k_mask_numpy(np.zeros((2, 2), dtype=np.int16), 1)
    with pytest.raises(ValueError, match="k=5"):
        top_k_mask_numpy(np.zeros(4, dtype=np.int16), 5)
    keys = np.array([3, 1, 2, 2, 5], dtype=np.float64)  # other dtypes: the numpy replay
    assert top_k_mask_numpy(keys, 2).tolist() == [True, False, False, False, True]
    keys = np.array([9, 3, 1, 7, 2, 8, 2, 5], dtype=np.int16)
    keys.flags.writeable = False  # copied first, as a strided view is
    assert top_k_mask_numpy(keys, 2).tolist() == [True, False, False, False, False, True, False, False]
    assert top_k_mask_numpy(keys[::-2], 2).tolist() == [False, True, True, False]  # 5, 8, 7, 3


def test_native_kernel_checks_its_buffers():
    native = introsort._native()
    if native is None:
        pytest.skip("the compiled kernel is not built (the `impl` tests fail for it where a compiler exists)")
    keys = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    mask = np.zeros(3, dtype=bool)
    assert native.top_k(keys, 2, mask) is True and mask.tolist() == [False, True, True]
    with pytest.raises(TypeError, match="int16, int32 or float32"):
        native.top_k(np.zeros(3, dtype=np.float64), 1, mask)
    with pytest.raises(ValueError, match="mask has 2 bytes"):
        native.top_k(np.zeros(3, dtype=np.int16), 1, np.zeros(2, dtype=bool))
    with pytest.raises(ValueError, match="outside"):
        native.top_k(np.zeros(3, dtype=np.int16), 4, mask)
    with pytest.raises((TypeError, ValueError, BufferError)):
        native.top_k(np.zeros(3, dtype=np.int16)[::-1], 1, mask)  # not contiguous
    frozen = np.zeros(3, dtype=np.int16)
    frozen.flags.writeable = False
    with pytest.raises((TypeError, ValueError, BufferError)):
        native.top_k(frozen, 1, mask)


def test_forced_numpy_replay_and_no_torch_at_import():
    code = ("import sys, os; os.environ['SURGERY_BACKEND'] = 'numpy'; from surgery.merge import topk as introsort; "
            "assert 'torch' not in sys.modules; assert introsort._native() is None; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
