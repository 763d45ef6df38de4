"""iso_c and iso_cts (isotropic merging): against the paper's reference formulas, written out here."""

from __future__ import annotations

import pytest
import torch
from own_methods import close_in_bfloat16, block, error_of, random_deltas, run_merge, task_vectors

from surgery.merge import iso


def reference_iso_c(deltas):
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    return torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), vh))


def reference_iso_cts(deltas, fraction=0.8):
    """The reference code's steps (iso_cts), float64, with its zero-padded full-size factor matrices."""
    T, r = len(deltas), min(deltas[0].shape)
    common = int(r * fraction)
    common = r - round((r - common) / T) * T
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    cu, cs, cvh = u[:, :common], s[:common], vh[:common]
    n = int((r - common) / T)
    U, S, V = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
    for i, w in enumerate(deltas):
        ut, st, vt = torch.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
        U[:, i * n:(i + 1) * n], S[i * n:(i + 1) * n], V[i * n:(i + 1) * n] = ut[:, :n], st[:n], vt[:n]
    U[:, T * n:T * n + common], S[T * n:T * n + common], V[T * n:T * n + common] = cu, cs, cvh
    a, _, b = torch.linalg.svd(U, full_matrices=False)
    c, _, d = torch.linalg.svd(V, full_matrices=False)
    return torch.linalg.multi_dot((a @ b, torch.diag(torch.ones_like(S) * S.mean()), c @ d))


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("shape,tasks", [((24, 40), 3), ((40, 24), 2), ((32, 32), 4)])
def test_iso_c_is_the_reference(shape, tasks):
    deltas = random_deltas(shape, tasks)
    got = iso.iso_c_delta([d.float() for d in deltas]).double()
    assert rel(got, reference_iso_c(deltas)) < 1e-5
    s = torch.linalg.svdvals(got)  # a flat spectrum at the mean of the sum's singular values
    r = torch.linalg.matrix_rank(sum(deltas))
    assert torch.allclose(s[:r], torch.full((r,), float(torch.linalg.svdvals(sum(deltas)).mean()),
                                             dtype=torch.float64), rtol=1e-5)


@pytest.mark.parametrize("shape,tasks,fraction", [((24, 40), 3, 0.8), ((40, 24), 2, 0.5), ((32, 32), 4, 0.9)])
def test_iso_cts_is_the_reference(shape, tasks, fraction):
    deltas = random_deltas(shape, tasks)
    got = iso.iso_cts_delta([d.float() for d in deltas], fraction).double()
    assert rel(got, reference_iso_cts(deltas, fraction)) < 1e-5


def test_split_rank_keeps_the_task_part_a_multiple_of_the_tasks():
    assert iso.split_rank(32, 3, 0.8) == (26, 2)  # int(25.6) = 25 common; round(7 / 3) = 2 per task
    assert iso.split_rank(32, 4, 1.0) == (32, 0)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_recipe_on_the_family_is_the_formula_tensor_by_tensor(family, tmp_path, method):
    extra = ", common_fraction: 0.5" if method == "iso_cts" else ""
    out, inputs = run_merge(tmp_path, family, f"{{method: {method}, base: base, models: [lang, task, en], "
                                              f"parameters: {{alpha: 1.3{extra}}}}}")
    for name, t in out.items():
        base, deltas = task_vectors(inputs[name])
        if t.ndim == 2 and block(name) is not None:  # models that left the matrix unchanged are not its tasks
            tasks = [d for d in deltas if d.abs().max() > 0]
            delta = reference_iso_c(tasks) if method == "iso_c" else reference_iso_cts(tasks, 0.5)
        else:
            delta = sum(deltas) / len(deltas)
        want = base + 1.3 * delta
        assert t.dtype == torch.bfloat16, name
        assert close_in_bfloat16(t, want, delta), name


@pytest.mark.parametrize("merge,where,message", [
    ("{method: iso_cts, base: base, models: [lang], parameters: {common_fracton: 0.5}}",
     "operations.0.merge.parameters.common_fracton", "did you mean 'common_fraction'?"),
    ("{method: iso_c, base: base, models: {lang: {wieght: 1}}}", "operations.0.merge.models.lang.wieght",
     "unknown parameter 'wieght' for merge method 'iso_c' (iso_c takes: no parameters)"),
])
def test_bad_parameters_are_one_line_naming_the_yaml_path(family, tmp_path, merge, where, message):
    msg = error_of(tmp_path, family, merge)
    assert len(msg.splitlines()) == 1 and f": {where}: " in msg and message in msg, msg
