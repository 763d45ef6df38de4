"""surgery.merge's host backends (numpy, compiled): mergekit's linear, task arithmetic and TIES without torch, bitwise
equal to mergekit's own kernels;
the written-out method specs equal mergekit's registry; such merges never import torch or mergekit."""

import itertools

import numpy as np
import pytest
import torch
from helpers import errors_numpy_and_torch, load, probe, raw_bytes, use_implementation, with_nan

import surgery
from surgery import merge
from surgery.core import host_math
from surgery.merge import native, topk
from surgery.merge.numeric import exact_product, merge_dtype
from surgery.merge.specs import LOCAL, REQUIRED, from_mergekit, get_method, method_names
from surgery.operations.merge import _compute


def supports(p, stored) -> bool:
    """The host backends compute this node (numpy or compiled)."""
    return merge.host_kernel(p, stored) is not None


def blockwise(p, stored) -> bool:
    return merge.host_kernel(p, stored).blockwise

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@pytest.fixture(params=["native", "numpy"])
def impl(request, monkeypatch):
    """Run the test on the compiled kernels (_elementwise.c) or the numpy steps."""
    use_implementation(request.param, monkeypatch, "_elementwise")
    return request.param


def hard_values(n: int, seed: int, dtype: str) -> torch.Tensor:
    """Normal values over 60 binades, plus ±0, subnormals, huge values, rounding ties, float32 midpoints."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g).float())
    if dtype == "F16":
        x = x.clamp(-60000, 60000) * 1e-4
    special = [0.0, -0.0, 1e-40, -1e-40, 2 ** -126, 1e-8, -1e-8, 7.0, 0.1, 1.5, -1.5, 1.0 + 2 ** -8, 3 * 2 ** -100]
    if dtype != "F16":
        special += [3e38, -3e38, 1e-45]
    x[:len(special)] = torch.tensor(special)
    return x.to(TORCH[dtype])


def params(method: str, ids: list, weights: list, base=None, dtype=None, **shared) -> dict:
    """A merge node's params as the planner builds them (every parameter resolved)."""
    spec = LOCAL[method]
    values = {p.name: shared.get(p.name, p.default) for p in spec.shared}
    per_input = {i: {"weight": w, **({"density": 1.0} if method != "linear" else {})}
                 for i, w in zip(ids, weights) if i != base}
    return {"method": method, "ids": ids, "base_index": ids.index(base) if base else None, "shared": values,
            "per_input": per_input, "dtype": dtype, "name": "t", "seed": None, "kernel": "exact", "vocab": None}


def mergekit(tensors, p, monkeypatch):
    """mergekit's own kernel (merge_tensors), through the op's torch path."""
    from surgery.core.devices import use_backend

    with use_backend("mergekit"):
        return _compute([t.clone() for t in tensors], p)


def same(got: bytes, want: torch.Tensor) -> bool:
    """Bitwise equal, except that any NaN equals any NaN (payloads differ between numpy and torch; the
    host path refuses non-finite results anyway)."""
    g = torch.frombuffer(bytearray(got), dtype=want.dtype).reshape(want.shape)
    nan = want.isnan()
    return torch.equal(nan, g.isnan()) and raw_bytes(g[~nan]) == raw_bytes(want[~nan])


def stored_bits(tensors, p, stored):
    """The compiled kernels' bfloat16-in, bfloat16-out form (host_math's direct path), or None where it does not
    apply; also checks the non-finite count it returns."""
    raws = [t.contiguous().view(torch.uint8).numpy().copy() for t in tensors]
    out = np.empty(tensors[0].numel(), dtype=np.uint16)
    kernel = merge.host_kernel(p, stored)
    bad = None if kernel.run_stored is None else kernel.run_stored(lambda: raws, "BF16", out)
    if bad is None:
        return None
    got = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
    assert bad == int((~torch.isfinite(got)).sum())
    return out.tobytes()


def numpy_bits(tensors, p, stored):
    arrays = [host_math.to_float32(t.contiguous().view(torch.uint8).numpy().copy(), s) for t, s in zip(tensors, stored)]
    dtype = merge_dtype(p, stored)
    with np.errstate(all="ignore"):
        values = merge.host_kernel(p, stored).run(arrays)
    out = np.empty(values.shape, dtype=host_math.HOST_DTYPES[dtype])
    host_math.from_float32(values, dtype, out, exact=True)
    return out.tobytes()


# weights whose products with every value of the dtype are exact in float32 (numpy); the rest stay on torch
LINEAR_WEIGHTS = ([0.5, 0.5], [0.25, 0.75], [1.0, -1.0], [0.5, -0.25, 0.125], [0.375, 0.625, 0.5, 1.0], [0.75],
                  [0.6, 0.4], [1 / 3, 2 / 3], [1.5, -0.5], [1.0, 1 + 2 ** -23])
INEXACT = ([0.6, 0.4], [1 / 3, 2 / 3], [1.5, -0.5], [1.0, 1 + 2 ** -23])


@pytest.mark.parametrize("dtype", list(TORCH))
@pytest.mark.parametrize("weights", LINEAR_WEIGHTS)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_is_bitwise_mergekit(dtype, weights, normalize, monkeypatch, impl):
    ids = [f"m{i}" for i in range(len(weights))]
    tensors = [hard_values(5003, seed=i, dtype=dtype) for i in range(len(weights))]
    p = params("linear", ids, weights, normalize=normalize)
    # numpy has no fused multiply-add: only weights whose products are exact in float32 (float32 inputs have 24 bits
    # and subnormals down to 2**-149: only 0 and ±1); the compiled kernel takes any weight (float16: numpy only)
    expected = (impl == "native" and dtype != "F16") or (
        weights not in INEXACT and (dtype != "F32" or all(abs(w) in (0, 1) for w in weights)))
    assert supports(p, [dtype] * len(ids)) == expected
    if expected:
        want = mergekit(tensors, p, monkeypatch)
        assert same(numpy_bits(tensors, p, [dtype] * len(ids)), want)
        direct = stored_bits(tensors, p, [dtype] * len(ids))
        assert (direct is not None) == (impl == "native" and dtype == "BF16")
        assert direct is None or same(direct, want)


def test_native_linear_is_fused_on_float32_midpoints(monkeypatch, impl):
    # x1*c lands exactly halfway between two float32s and a tiny accumulator (x0) decides the fused rounding,
    # which a multiply then an add (or float64 alone: one rounding that drops x0) gets wrong for half of them
    n, c = 64, 1.0 + 2 ** -23
    x0 = torch.tensor([(-1.0) ** i * 2.0 ** -(60 + i) for i in range(n)], dtype=torch.float32)
    x1 = torch.tensor([1.5 * 2.0 ** (i % 8 - 4) for i in range(n)], dtype=torch.float32)
    p = params("linear", ["a", "b"], [1.0, c], normalize=False)
    assert supports(p, ["F32", "F32"]) == (impl == "native")
    if impl == "numpy":
        return
    want = mergekit([x0, x1], p, monkeypatch)
    assert ((x1.double() * c + x0.double()).float() != want).sum() == n // 2  # the case needs the fused step
    assert numpy_bits([x0, x1], p, ["F32", "F32"]) == raw_bytes(want)


def test_native_kernels_check_their_buffers():
    kernels = native.load("_elementwise")
    if kernels is None:
        pytest.skip("the compiled kernels are not built (the `impl` tests fail for them where a compiler exists)")
    x, out = np.ones(4, np.float32), np.empty(4, np.float32)
    kernels.linear(out, [x, x * 2], [0.5, 0.25], None, False)
    assert out.tolist() == [1.0] * 4
    kernels.task_arithmetic(out, x, [x * 3], [0.5], None, 2.0, True)
    assert out.tolist() == [3.0] * 4  # 1 + (3 - 1) * 0.5 * 2
    with pytest.raises(ValueError, match="buffer of the output's type and length"):
        kernels.linear(out, [np.ones(3, np.float32)], [1.0], None, False)
    with pytest.raises(ValueError, match="buffer of the output's type and length"):
        kernels.linear(out, [np.ones(4, np.float64)], [1.0], None, False)
    with pytest.raises(ValueError, match="buffer of the output's type and length"):
        kernels.linear(out, [np.ones(4, np.uint16)], [1.0], None, False)  # bfloat16 inputs, float32 out
    with pytest.raises(ValueError, match="float32 or uint16"):
        kernels.linear(np.empty(4, np.float64), [x], [1.0], None, False)
    one = np.full(4, 0x3F80, np.uint16)  # bfloat16 1.0
    big = np.full(4, 0x7F7F, np.uint16)  # the largest finite bfloat16
    out16 = np.empty(4, np.uint16)
    assert kernels.linear(out16, [one, one], [0.5, 0.25], None, False) == 0
    assert out16.tolist() == [0x3F40] * 4  # 0.75
    low = np.full(4, 0xFF7F, np.uint16)  # the lowest finite bfloat16
    assert kernels.task_arithmetic(out16, low, [big], [1.0], None, 1.0, True) == 4  # big - low overflows
    assert out16.tolist() == [0x7F80] * 4
    assert kernels.task_arithmetic(out16, one, [big], [1.0], None, 1.0, True) == 0  # 1 + (big - 1) = big
    assert out16.tolist() == [0x7F7F] * 4
    with pytest.raises(ValueError, match="at most 8 bfloat16 inputs"):
        kernels.linear(out16, [one] * 9, [0.1] * 9, None, False)
    with pytest.raises(ValueError, match="expected 2 values"):
        kernels.linear(out, [x, x], [1.0], None, False)
    with pytest.raises(ValueError, match="between 1 and 64 inputs"):
        kernels.linear(out, [], [], None, False)
    with pytest.raises(ValueError, match="not C-contiguous"):
        kernels.linear(np.empty(8, np.float32)[::2], [x], [1.0], None, False)  # not contiguous
    # task arithmetic and TIES take a base too (one argument group in the C code)
    with pytest.raises(ValueError, match="base must be a buffer of the output's type and length"):
        kernels.task_arithmetic(out, np.ones(5, np.float32), [x], [1.0], None, 1.0, False)
    with pytest.raises(TypeError):
        kernels.task_arithmetic(out, x, [x], [1.0], "two", 1.0, False)  # the divisor
    with pytest.raises(ValueError, match="ties: out must be a float32 buffer"):
        kernels.ties(out16, one, [one], [1.0], True, 1.0, True)
    with pytest.raises(ValueError, match="at most 8 deltas, got 9"):
        kernels.ties(out, x, [x] * 9, [0.1] * 9, True, 1.0, False)
    with pytest.raises(ValueError, match="weights: expected 2 values"):
        kernels.ties(out, x, [x, x], [1.0], True, 1.0, False)


TA_CASES = [([0.6, 0.4], {}), ([0.5, 0.5], {"normalize": True}), ([0.3, -0.7, 1.2], {"lambda": 0.7}),
            ([1.0], {"normalize": True, "lambda": 1.5}), ([0.25, 0.25, 0.25, 0.5], {"normalize": True}),
            ([1e-9, -1e-9], {"normalize": True})]


@pytest.mark.parametrize("dtype", list(TORCH))
@pytest.mark.parametrize("weights, shared", TA_CASES)
def test_task_arithmetic_is_bitwise_mergekit(dtype, weights, shared, monkeypatch, impl):
    ids = [f"m{i}" for i in range(len(weights))] + ["base"]
    tensors = [hard_values(5003, seed=10 + i, dtype=dtype) for i in range(len(ids))]
    tensors = [t if i == len(ids) - 1 else (tensors[-1].float() + t.float() * 0.01).to(t.dtype)
               for i, t in enumerate(tensors)]  # experts near the base, as fine-tunes are
    p = params("task_arithmetic", ids, weights + [None], base="base", **shared)
    assert supports(p, [dtype] * len(ids))
    want = mergekit(tensors, p, monkeypatch)
    assert same(numpy_bits(tensors, p, [dtype] * len(ids)), want)
    direct = stored_bits(tensors, p, [dtype] * len(ids))
    assert (direct is not None) == (impl == "native" and dtype == "BF16")
    assert direct is None or same(direct, want)


TIES_CASES = [([0.5, 0.5], [0.5, 0.5], {}), ([0.3, -0.7, 1.2], [0.3, 1.0, 0.9], {"lambda": 0.7}),
              ([1.0], [0.2], {"normalize": False}), ([0.25, 0.25, 0.25, 0.5], [0.5, 0.0, 0.7, 0.1], {}),
              ([0.6, 0.4], [1.0, 1.0], {"int8_mask": True})]


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
@pytest.mark.parametrize("weights, densities, shared", TIES_CASES)
def test_ties_is_bitwise_mergekit(dtype, weights, densities, shared, monkeypatch, impl):
    ids = [f"m{i}" for i in range(len(weights))] + ["base"]
    g = torch.Generator().manual_seed(7)
    base = hard_values(6007, seed=30, dtype=dtype)
    # experts near the base, with many equal magnitudes (ties at the density threshold) and opposite signs
    tensors = [(base.float() + torch.randint(-3, 4, base.shape, generator=g).float() * 2 ** -9).to(base.dtype)
               for _ in weights] + [base]
    p = params("ties", ids, weights + [None], base="base", **shared)
    for i, density in zip(ids, densities):
        p["per_input"][i]["density"] = density
    assert supports(p, [dtype] * len(ids)) == (impl == "native")
    if impl == "native":
        want = mergekit(tensors, p, monkeypatch)
        assert same(numpy_bits(tensors, p, [dtype] * len(ids)), want)
        assert not blockwise(p, [dtype] * len(ids))


def test_ties_falls_back_to_the_real_sort_where_the_replay_is_not_exact(monkeypatch):
    if native.load("_elementwise") is None or native.load("_introsort") is None:
        pytest.skip("the compiled kernels are not built (the `impl` tests fail for them where a compiler exists)")
    calls = []
    monkeypatch.setattr(topk, "top_k_mask_numpy", lambda keys, k: calls.append(k))  # "not exact": None
    base = hard_values(3001, seed=40, dtype="BF16")
    tensors = [(base.float() + torch.randn(base.shape) * 0.01).bfloat16() for _ in range(2)] + [base]
    p = params("ties", ["a", "b", "base"], [0.5, 0.5, None], base="base")
    for i in ("a", "b"):
        p["per_input"][i]["density"] = 0.3
    want = mergekit(tensors, p, monkeypatch)
    assert same(numpy_bits(tensors, p, ["BF16"] * 3), want)
    assert calls == [900, 900]


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_nan_is_refused_like_on_the_torch_path(family, tmp_path, monkeypatch, method, impl):
    n = "model.layers.0.mlp.down_proj.weight"
    bad = with_nan(family["lang"], tmp_path / "bad", n, (0, slice(0, 3)))
    r = merge_recipe({**family, "lang": bad}, method)
    if method == "ties":
        r["operations"][0]["merge"]["models"] = {"lang": {"weight": 0.5, "density": 0.5},
                                                 "task": {"weight": 0.5, "density": 0.5}}
    errors = errors_numpy_and_torch(r, tmp_path, monkeypatch)
    assert errors[0] == errors[1] and n in errors[0] and "NaN" in errors[0]


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
@pytest.mark.parametrize("stored, dtype", [(["BF16", "F32", "BF16"], "float16"), (["F16", "BF16", "F16"], None),
                                           (["BF16", "BF16", "BF16"], "float32")])
def test_conversions_and_promotion_are_mergekit(method, stored, dtype, monkeypatch, impl):
    ids = ["a", "b", "base"]
    tensors = [hard_values(3001, seed=20 + i, dtype="F16").to(TORCH[s]) for i, s in enumerate(stored)]
    weights = [1.0, -1.0, 1.0] if method == "linear" else [0.6, 0.4, None]
    p = params(method, ids, weights, base="base" if method != "linear" else None, dtype=dtype)
    if not supports(p, stored):
        assert method == "linear" and dtype is None  # linear over mixed dtypes: mergekit's own kernel
        return
    want = mergekit(tensors, p, monkeypatch)
    assert merge_dtype(p, stored) == {torch.bfloat16: "BF16", torch.float16: "F16",
                                                  torch.float32: "F32"}[want.dtype]
    assert same(numpy_bits(tensors, p, stored), want)


def test_what_the_kernels_leave_to_torch(monkeypatch):
    monkeypatch.setenv("SURGERY_BACKEND", "numpy")
    assert not supports(params("linear", list("abcde"), [0.25] * 5), ["BF16"] * 5)  # 5-term sum order
    assert supports(params("linear", list("abcde"), [0.25] * 5, normalize=False), ["BF16"] * 5)
    assert not supports(params("linear", ["a", "b"], [0.6, 0.4]), ["BF16"] * 2)  # fused steps
    assert supports(params("linear", ["a", "b"], [0.5, 0.5]), ["F16"] * 2)
    assert not supports(params("task_arithmetic", list("abcdef"), [0.2] * 5 + [None], base="f"),
                                    ["BF16"] * 6)
    assert not supports(params("linear", ["a", "b"], [0.5, 0.5], dtype="float64"), ["BF16"] * 2)
    assert not supports({**params("linear", ["a"], [1.0]), "method": "ties"}, ["BF16"])


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_exact_product_rule_by_brute_force(dtype):
    """exact_product(c, dtype) holds exactly when x*c is a float32 for every finite x of the dtype (and |c| <= 1)."""
    if dtype == "BF16":
        x = (np.arange(0, 0x7F80, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)
    else:
        x = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    for c in (0.5, 0.75, 0.6, 1 / 3, 2 ** -20, 2 ** -126, 1.0, 255 / 256, 8191 / 8192, 65535 / 65536, 1.5, 0.0,
              -0.375, -1.0):
        c32 = float(np.float32(c))
        with np.errstate(over="ignore", under="ignore"):
            exact = np.array_equal((x * c32).astype(np.float32).astype(np.float64), x * c32)
        assert exact_product(c32, dtype) == (exact and abs(c32) <= 1), (dtype, c)


def test_exact_product_on_float32():
    assert exact_product(1.0, "F32") and exact_product(-1.0, "F32")
    tiny = np.float32(2 ** -149)  # the smallest subnormal: halving it is not exact
    assert np.float32(tiny * np.float32(0.5)) * 2 != tiny and not exact_product(0.5, "F32")


def test_written_out_specs_are_mergekit_registry():
    """Same parameters (name, type, scope, default) and the same input checks, message for message."""
    for name, local in LOCAL.items():
        if not local.mergekit:  # surgery's own methods (tests/merge/test_tsv_m.py, ...): not in mergekit's registry
            assert name not in method_names(), name
            continue
        theirs = from_mergekit(get_method(name))
        assert [(p.name, p.value_type, p.scope, p.default if p.default is not REQUIRED else "required")
                for p in local.parameters] == \
               [(p.name, p.value_type, p.scope, p.default if p.default is not REQUIRED else "required")
                for p in theirs.parameters], name
        assert local.base == theirs.base, name
        for ids, base in itertools.product([["a"], ["a", "b"], ["a", "a"], ["a", None]], [None, "a", "z"]):
            outcomes = []
            for spec in (local, theirs):
                try:
                    spec.validate_inputs(ids, base)
                    outcomes.append("ok")
                except ValueError as e:
                    outcomes.append(str(e))
            assert outcomes[0] == outcomes[1], (name, ids, base)
        for p in local.parameters:  # pydantic's lax validation, as mergekit's
            for value in (0.5, "0.5", True, "yes", 3):
                try:
                    a = p.validate(value)
                except Exception as e:  # noqa: BLE001
                    a = type(e).__name__
                try:
                    b = next(q for q in theirs.parameters if q.name == p.name).validate(value)
                except Exception as e:  # noqa: BLE001
                    b = type(e).__name__
                assert a == b, (name, p.name, value)


def merge_recipe(family, method, w=None, **extra):
    w = w or ((0.75, 0.25) if method == "linear" else (0.6, 0.4))  # linear: products exact in float32 (numpy)
    models = {"lang": {"weight": w[0]}, "task": {"weight": w[1]}}
    op = {"method": method, "models": models, **({"base": "en"} if method != "linear" else {}), **extra}
    return {"inputs": {k: str(v) for k, v in family.items()}, "recipient": "task", "operations": [{"merge": op}]}


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_merge_runs_write_the_same_bytes_through_numpy_and_torch(family, tmp_path, monkeypatch, method, impl):
    inexact = (0.6, 0.4) if impl == "native" else None  # the compiled kernel's fused steps, in a whole run
    r = merge_recipe(family, method, w=inexact, parameters={"normalize": True})
    r32 = {**r, "output": {"dtype": "float32"}}
    surgery.run(r32, tmp_path / "numpy")
    surgery.run(r, tmp_path / "numpy16")
    monkeypatch.setenv("SURGERY_BACKEND", "torch")
    surgery.run(r32, tmp_path / "torch")
    surgery.run(r, tmp_path / "torch16")
    for a, b in (("numpy", "torch"), ("numpy16", "torch16")):
        x, y = load(tmp_path / a), load(tmp_path / b)
        assert x.keys() == y.keys()
        assert all(x[n].dtype == y[n].dtype and raw_bytes(x[n]) == raw_bytes(y[n]) for n in x), a


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_such_merges_never_import_torch_or_mergekit(family, tmp_path, monkeypatch, method):
    import json

    r = merge_recipe(family, method)
    (tmp_path / "r.json").write_text(json.dumps(r))
    modules = probe("run", tmp_path / "r.json", "-o", tmp_path / "out", "-q")["modules"]
    assert sorted({m.split(".")[0] for m in modules} & {"torch", "mergekit"}) == []
    monkeypatch.setenv("SURGERY_BACKEND", "mergekit")  # mergekit's own kernel
    surgery.run(r, tmp_path / "mergekit")
    got, want = load(tmp_path / "out"), load(tmp_path / "mergekit")
    assert all(raw_bytes(got[n]) == raw_bytes(want[n]) for n in want)
    n = "model.layers.0.self_attn.q_proj.weight"  # 'lang' changed layer 0
    assert not torch.equal(got[n], load(family["task"])[n])  # a merged tensor, not a copy
