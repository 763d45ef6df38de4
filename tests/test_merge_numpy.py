"""operations.merge_numpy: mergekit's linear and task arithmetic without torch, bitwise equal to mergekit's own kernels;
the written-out method specs equal mergekit's registry; such merges never import torch or mergekit."""

import itertools
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load, raw_bytes

import surgery
from surgery.core import host_math
from surgery.operations import merge_numpy
from surgery.operations.merge import _compute
from surgery.operations.merge_specs import LOCAL, REQUIRED, from_mergekit, get_method

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


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
    monkeypatch.setenv("SURGERY_MERGEKIT_KERNELS", "1")
    return _compute([t.clone() for t in tensors], p)


def same(got: bytes, want: torch.Tensor) -> bool:
    """Bitwise equal, except that any NaN equals any NaN (payloads differ between numpy and torch; the
    host path refuses non-finite results anyway)."""
    g = torch.frombuffer(bytearray(got), dtype=want.dtype).reshape(want.shape)
    nan = want.isnan()
    return torch.equal(nan, g.isnan()) and raw_bytes(g[~nan]) == raw_bytes(want[~nan])


def numpy_bits(tensors, p, stored):
    arrays = [host_math.to_float32(t.contiguous().view(torch.uint8).numpy().copy(), s) for t, s in zip(tensors, stored)]
    dtype = merge_numpy.merge_dtype(p, stored)
    with np.errstate(all="ignore"):
        values = merge_numpy.compute(arrays, p, stored)
    out = np.empty(values.shape, dtype=host_math.HOST_DTYPES[dtype])
    host_math.from_float32(values, dtype, out, exact=True)
    return out.tobytes()


LINEAR_WEIGHTS = ([0.5, 0.5], [0.6, 0.4], [1 / 3, 2.75, -0.125], [1.0, -1.0], [1 + 2 ** -23, 1.0],
                  [0.3, 0.2, 0.5, 1e-3], [0.75])


@pytest.mark.parametrize("dtype", list(TORCH))
@pytest.mark.parametrize("weights", LINEAR_WEIGHTS)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_is_bitwise_mergekit(dtype, weights, normalize, monkeypatch):
    ids = [f"m{i}" for i in range(len(weights))]
    tensors = [hard_values(5003, seed=i, dtype=dtype) for i in range(len(weights))]
    p = params("linear", ids, weights, normalize=normalize)
    assert merge_numpy.supports(p, [dtype] * len(ids))
    want = mergekit(tensors, p, monkeypatch)
    assert same(numpy_bits(tensors, p, [dtype] * len(ids)), want)


def round_f32(x: Fraction) -> float:
    """The float32 nearest to x, ties to even (exact: no float64 step)."""
    f = np.float32(float(x))
    near = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    best = min(near, key=lambda c: (abs(Fraction(float(c)) - x), int(np.array(c).view(np.int32)) & 1))
    return float(best)


def test_linear_fused_step_on_float32_midpoints(monkeypatch):
    # x1*c lands exactly halfway between two float32s and a tiny accumulator (x0) decides the fused rounding,
    # which float64 alone (one rounding there that drops x0, then ties-to-even) gets wrong for half of them
    n, c = 64, 1.0 + 2 ** -23
    x0 = torch.tensor([(-1.0) ** i * 2.0 ** -(60 + i) for i in range(n)], dtype=torch.float32)
    x1 = torch.tensor([1.5 * 2.0 ** (i % 8 - 4) for i in range(n)], dtype=torch.float32)
    p = params("linear", ["a", "b"], [1.0, c], normalize=False)
    want = mergekit([x0, x1], p, monkeypatch)
    exact = [round_f32(Fraction(float(a)) + Fraction(float(b)) * Fraction(c)) for a, b in zip(x0, x1)]
    assert want.tolist() == exact  # torch's addcmul is fused
    plain = (x1.double() * c + x0.double()).float()
    assert (plain != want).sum() == n // 2  # float64 alone is not enough
    assert numpy_bits([x0, x1], p, ["F32", "F32"]) == raw_bytes(want)


TA_CASES = [([0.6, 0.4], {}), ([0.5, 0.5], {"normalize": True}), ([0.3, -0.7, 1.2], {"lambda": 0.7}),
            ([1.0], {"normalize": True, "lambda": 1.5}), ([0.25, 0.25, 0.25, 0.5], {"normalize": True}),
            ([1e-9, -1e-9], {"normalize": True})]


@pytest.mark.parametrize("dtype", list(TORCH))
@pytest.mark.parametrize("weights, shared", TA_CASES)
def test_task_arithmetic_is_bitwise_mergekit(dtype, weights, shared, monkeypatch):
    ids = [f"m{i}" for i in range(len(weights))] + ["base"]
    tensors = [hard_values(5003, seed=10 + i, dtype=dtype) for i in range(len(ids))]
    tensors = [t if i == len(ids) - 1 else (tensors[-1].float() + t.float() * 0.01).to(t.dtype)
               for i, t in enumerate(tensors)]  # experts near the base, as fine-tunes are
    p = params("task_arithmetic", ids, weights + [None], base="base", **shared)
    assert merge_numpy.supports(p, [dtype] * len(ids))
    want = mergekit(tensors, p, monkeypatch)
    assert same(numpy_bits(tensors, p, [dtype] * len(ids)), want)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
@pytest.mark.parametrize("stored, dtype", [(["BF16", "F32", "BF16"], "float16"), (["F16", "BF16", "F16"], None),
                                           (["BF16", "BF16", "BF16"], "float32")])
def test_conversions_and_promotion_are_mergekit(method, stored, dtype, monkeypatch):
    ids = ["a", "b", "base"]
    tensors = [hard_values(3001, seed=20 + i, dtype="F16").to(TORCH[s]) for i, s in enumerate(stored)]
    p = params(method, ids, [0.6, 0.4, 0.2][:3 if method == "linear" else 2] + ([None] if method != "linear" else []),
               base="base" if method != "linear" else None, dtype=dtype)
    if not merge_numpy.supports(p, stored):
        assert method == "linear" and dtype is None  # linear over mixed dtypes: mergekit's own kernel
        return
    want = mergekit(tensors, p, monkeypatch)
    assert merge_numpy.merge_dtype(p, stored) == {torch.bfloat16: "BF16", torch.float16: "F16",
                                                  torch.float32: "F32"}[want.dtype]
    assert same(numpy_bits(tensors, p, stored), want)


def test_what_the_kernels_leave_to_torch():
    assert not merge_numpy.supports(params("linear", list("abcde"), [0.2] * 5), ["BF16"] * 5)  # 5-term sum order
    assert merge_numpy.supports(params("linear", list("abcde"), [0.2] * 5, normalize=False), ["BF16"] * 5)
    assert not merge_numpy.supports(params("task_arithmetic", list("abcdef"), [0.2] * 5 + [None], base="f"),
                                    ["BF16"] * 6)
    assert not merge_numpy.supports(params("linear", ["a", "b"], [0.5, 0.5], dtype="float64"), ["BF16"] * 2)
    assert not merge_numpy.supports({**params("linear", ["a"], [1.0]), "method": "ties"}, ["BF16"])


def test_exact_product_rule_by_brute_force():
    """exact_product(c, BF16) holds exactly when x*c is a float32 for every bfloat16 x."""
    x = (np.arange(0, 0x7F80, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)  # every finite bf16 >= 0
    for c in (0.5, 0.75, 0.6, 1 / 3, 2 ** -20, 1 + 2 ** -15, 1 + 2 ** -16, 255 / 256, 1.5, 0.0, -0.375):
        c32 = float(np.float32(c))
        with np.errstate(over="ignore"):
            exact = np.array_equal((x * c32).astype(np.float32).astype(np.float64), x * c32)
        assert merge_numpy.exact_product(c32, "BF16") == (exact and abs(c32) <= 1), c


def test_written_out_specs_are_mergekit_registry():
    """Same parameters (name, type, scope, default) and the same input checks, message for message."""
    for name, local in LOCAL.items():
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


def merge_recipe(family, method, **extra):
    models = {"lang": {"weight": 0.6}, "task": {"weight": 0.4}}
    op = {"method": method, "models": models, **({"base": "en"} if method == "task_arithmetic" else {}), **extra}
    return {"inputs": {k: str(v) for k, v in family.items()}, "recipient": "task", "operations": [{"merge": op}]}


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_merge_runs_write_the_same_bytes_through_numpy_and_torch(family, tmp_path, monkeypatch, method):
    r = merge_recipe(family, method, parameters={"normalize": True})
    r32 = {**r, "output": {"dtype": "float32"}}
    surgery.run(r32, tmp_path / "numpy")
    surgery.run(r, tmp_path / "numpy16")
    monkeypatch.setenv("SURGERY_NUMPY", "0")
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
    code = ("import sys; from surgery.cli import cli\n"
            "try:\n    cli(['run', sys.argv[1], '-o', sys.argv[2], '-q'])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'mergekit'}))")
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.json"), str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
    monkeypatch.setenv("SURGERY_MERGEKIT_KERNELS", "1")  # mergekit's own kernel
    monkeypatch.setenv("SURGERY_NUMPY", "0")
    surgery.run(r, tmp_path / "mergekit")
    got, want = load(tmp_path / "out"), load(tmp_path / "mergekit")
    assert all(raw_bytes(got[n]) == raw_bytes(want[n]) for n in want)
    n = "model.layers.0.self_attn.q_proj.weight"  # 'lang' changed layer 0
    assert not torch.equal(got[n], load(family["task"])[n])  # a merged tensor, not a copy
