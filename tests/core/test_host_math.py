"""core.host_math: weighted sums in numpy, bitwise equal to the torch path, and plans that never import torch."""

import numpy as np
import pytest
import torch
from helpers import errors_numpy_and_torch, load, probe, raw_bytes, with_nan

import surgery
from surgery.core import host_math
from surgery.core.graph import Ref, evaluate, linear

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
COEFFS = ([0.3, 0.7], [1.0, -0.5, 0.5], [1 / 3, -2.75, 1e-3], [0.6, 0.4], [-1.0, 1.0])


def hard_values(n: int, seed: int) -> torch.Tensor:
    """Normal values plus the cases rounding gets wrong first: ±0, subnormals, huge, ties, float32 extremes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g).float())
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1e-45, 3e38, -3e38, 65504.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -9,
                            2 ** -126, 1e-8, -1e-8, 7.0, 0.1])
    x[:len(special)] = special
    return x


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("coeffs", COEFFS)
def test_numpy_weighted_sum_is_bitwise_the_torch_one(dtype, coeffs):
    tensors = {f"t{i}": hard_values(4099, seed=i).to(DTYPES[dtype]) for i in range(len(coeffs))}
    node = linear([(c, Ref("m", n)) for c, n in zip(coeffs, tensors)])
    want = evaluate(node, lambda r: tensors[r.name]).to(DTYPES[dtype])  # the torch kernel, cast as the writer does

    def read(r):
        raw = tensors[r.name].contiguous().view(torch.uint8).numpy().copy()
        return host_math.to_float32(raw, dtype)

    with np.errstate(all="ignore"):
        got = stored(host_math.evaluate(node, read, host_math.kernels(node, lambda r: dtype)), dtype)
    assert got.tobytes() == raw_bytes(want)


def stored(x, dtype):
    out = np.empty(x.shape, dtype=host_math.HOST_DTYPES[dtype])
    host_math.from_float32(x, dtype, out)
    return out


def test_bfloat16_rounding_matches_torch_on_every_tie():
    # every float32 whose low 16 bits are exactly 0x8000 (a tie) or one off it, over a range of exponents
    hi = np.arange(0x0080, 0x7F00, 7, dtype=np.uint32) << 16
    bits = np.concatenate([hi | 0x8000, hi | 0x7FFF, hi | 0x8001, (hi | 0x8000) | 0x80000000])
    x = bits.view(np.float32)
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(stored(x.copy(), "BF16"), want)


def recipe(family, ops, **extra):
    return {"inputs": {k: str(v) for k, v in family.items()}, "recipient": "task", "operations": ops, **extra}


OPS = [{"arithmetic": {"expr": "task + 0.3*(lang - en)", "select": {"layers": "2-3"}}},
       {"layer_swap": {"donor": "lang", "bottom": 2, "top": 1, "transition": 2, "lm_head": 0.3}}]


@pytest.mark.parametrize("dtype", [None, "float16", "float32"])
def test_runs_through_numpy_and_torch_write_the_same_bytes(family, tmp_path, monkeypatch, dtype):
    r = recipe(family, OPS, **({"output": {"dtype": dtype}} if dtype else {}))
    surgery.run(r, tmp_path / "numpy")
    monkeypatch.setenv("SURGERY_BACKEND", "torch")
    surgery.run(r, tmp_path / "torch")
    a, b = load(tmp_path / "numpy"), load(tmp_path / "torch")
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and raw_bytes(a[n]) == raw_bytes(b[n]), n
    lang, task = load(family["lang"]), load(family["task"])
    n = "model.layers.5.mlp.up_proj.weight"  # transition layer 5: donor weight 1/3, then the output dtype
    want = (lang[n].float() * (1 / 3) + task[n].float() * (2 / 3)).to(DTYPES[{None: "BF16", "float16": "F16",
                                                                             "float32": "F32"}[dtype]])
    assert raw_bytes(a[n]) == raw_bytes(want)


def test_numpy_path_in_row_blocks_gives_the_same_bytes(family, tmp_path, monkeypatch):
    r = recipe(family, OPS)
    surgery.run(r, tmp_path / "whole")
    monkeypatch.setattr(host_math, "HOST_BLOCK_BYTES", 1000)  # blocks of a few rows even on the tiny model
    reads = []
    real = host_math.read
    monkeypatch.setattr(host_math, "read", lambda ck, name, rows: reads.append(rows) or real(ck, name, rows))
    surgery.run(r, tmp_path / "blocks")
    assert any(rows and rows[0] > 0 for rows in reads)
    whole, blocks = load(tmp_path / "whole"), load(tmp_path / "blocks")
    assert all(raw_bytes(whole[n]) == raw_bytes(blocks[n]) for n in whole)


def test_swap_with_transitions_never_imports_torch(family, tmp_path):
    (tmp_path / "r.yaml").write_text(
        f"inputs: {{lang: {family['lang']}, task: {family['task']}}}\nrecipient: task\n"
        "operations:\n  - layer_swap: {donor: lang, bottom: 2, top: 1, transition: 2}\n")
    modules = probe("run", tmp_path / "r.yaml", "-o", tmp_path / "out", "-q")["modules"]
    assert [m for m in modules if m == "torch" or m.startswith("torch.")] == []
    got, lang, task = load(tmp_path / "out"), load(family["lang"]), load(family["task"])
    n = "model.layers.2.self_attn.q_proj.weight"  # transition: donor weight 2/3
    assert raw_bytes(got[n]) == raw_bytes((lang[n].float() * (2 / 3) + task[n].float() * (1 / 3)).to(torch.bfloat16))


def test_numpy_path_refuses_nan_like_the_torch_path(tmp_path, family, monkeypatch):
    n = "model.layers.2.mlp.down_proj.weight"
    bad = with_nan(family["lang"], tmp_path / "bad", n, (0, 0))
    r = recipe({"task": family["task"], "lang": bad}, [{"layer_swap": {"donor": "lang", "bottom": 2, "top": 1,
                                                                       "transition": 2}}])
    errors = errors_numpy_and_torch(r, tmp_path, monkeypatch)
    assert errors[0] == errors[1]
    assert f"tensor {n!r}: 1 non-finite values (NaN/Inf) in the output; the inputs hold them: 1 in " in errors[0]
