"""The exact TIES selection without sorting equals mergekit's argsort (ties included), and its fallbacks."""

import pytest
import torch

from surgery.operations import introsort
from surgery.operations.introsort import top_k_mask


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
def test_same_entries_as_torch_argsort(seed):
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


def test_ties_are_not_decided_by_lowest_index():
    # the point of replaying introsort: a stable rule (lowest index first) keeps different entries
    w = (torch.randn(100_000, generator=torch.Generator().manual_seed(3)) * 0.002).bfloat16().float().abs()
    k = w.numel() // 2
    stable = torch.zeros_like(argsort_mask(w, k))
    stable[torch.sort(w, descending=True, stable=True).indices[:k]] = True
    assert not torch.equal(stable, argsort_mask(w, k))
    assert torch.equal(top_k_mask(w, k), argsort_mask(w, k))


def test_overwrite_reorders_the_input_only_when_asked():
    w = torch.rand(50_000)
    before = w.clone()
    top_k_mask(w, 1000)
    assert torch.equal(w, before)
    mask = top_k_mask(w, 1000, overwrite=True)
    assert torch.equal(mask, argsort_mask(before, 1000)) and not torch.equal(w, before)


def test_falls_back_where_replay_is_not_exact(monkeypatch):
    w = torch.rand(1000)
    w[5] = float("nan")
    assert top_k_mask(w, 10) is None
    assert top_k_mask(torch.rand(4, 4), 3) is None  # not 1-D
    monkeypatch.setattr(introsort, "_partition", lambda *a: None)
    assert top_k_mask(torch.rand(1000), 10) is None
    assert torch.equal(top_k_mask(torch.rand(10), 0), torch.zeros(10, dtype=torch.bool))
    assert torch.equal(top_k_mask(torch.rand(10), 10), torch.ones(10, dtype=torch.bool))


def test_magnitude_exact_equals_mergekit_magnitude():
    from mergekit.sparsify import RescaleNorm, magnitude

    from surgery.operations.merge_kernels import magnitude_exact

    g = torch.Generator().manual_seed(4)
    delta = ((torch.randn(300, 200, generator=g) * 0.02).bfloat16() - (torch.randn(300, 200, generator=g) * 0.02)
             .bfloat16())
    for density, norm in ((0.5, None), (0.3, RescaleNorm.l1), (0.9, None), (1.0, None), (0.0, None)):
        got, want = magnitude_exact(delta, density, norm), magnitude(delta, density, norm)
        assert got.dtype == want.dtype and torch.equal(got.view(torch.int16), want.view(torch.int16)), density


def test_magnitude_exact_leaves_float32_input_alone():
    from mergekit.sparsify import magnitude

    from surgery.operations.merge_kernels import magnitude_exact

    delta = torch.randn(200, 100, generator=torch.Generator().manual_seed(5))
    before = delta.clone()
    assert torch.equal(magnitude_exact(delta, 0.4), magnitude(before, 0.4))
    assert torch.equal(delta, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_integer_magnitude_keys_select_like_the_float_sort(dtype):
    from surgery.operations.introsort import magnitude_keys

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
