"""What the tests of surgery's own merge methods (tsv_m, iso_c, iso_cts, lines, consensus) share: a recipe run on
the ``family`` fixture, the inputs' tensors, and the family's block rule written out (not surgery's)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from helpers import load

MODELS = ("lang", "task", "en")
LAYERS = 8  # tests/helpers.py TINY


def recipe(tmp_path: Path, family: dict, merge: str, name: str = "r.yaml") -> Path:
    inputs = "".join(f"  {n}: {p}\n" for n, p in family.items())
    path = tmp_path / name
    path.write_text(f"inputs:\n{inputs}recipient: base\noperations:\n  - merge: {merge}\n")
    return path


def run_merge(tmp_path: Path, family: dict, merge: str):
    """(the output's tensors, name -> {input: tensor})."""
    from surgery import run

    run(recipe(tmp_path, family, merge), tmp_path / "out")
    out = load(tmp_path / "out")
    files = {n: safe_open(str(p / "model.safetensors"), "pt") for n, p in family.items()}
    return out, {name: {n: f.get_tensor(name) for n, f in files.items()} for name in out}


def block(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def task_vectors(inputs: dict, models=MODELS):
    """(base, [task vectors]) in float64, from the stored tensors."""
    base = inputs["base"].double()
    return base, [inputs[m].double() - base for m in models]


def random_deltas(shape=(24, 40), tasks=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) * (1 + t) for t in range(tasks)]


def error_of(tmp_path: Path, family: dict, merge: str) -> str:
    from surgery import run
    from surgery.errors import SurgeryError

    path = recipe(tmp_path, family, merge, "bad.yaml")
    try:
        run(path, tmp_path / "bad-out")
    except SurgeryError as e:
        assert not (tmp_path / "bad-out").exists()
        return str(e).replace(str(path), "r.yaml")
    raise AssertionError("no error")


def close_in_bfloat16(t, want, delta) -> bool:
    """``t`` (bfloat16) is the float64 formula ``want`` rounded to bfloat16, give or take the float32 SVD's error:
    half an ulp of the value, plus 1e-4 of the delta's largest entry."""
    return bool(((t.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-4 * float(delta.abs().max())).all())
