"""tsv_m (Task Singular Vectors: Merging): against the paper's reference formula, written out here."""

from __future__ import annotations

import pytest
import torch
from own_methods import close_in_bfloat16, LAYERS, block, error_of, random_deltas, run_merge, task_vectors

from surgery.merge import tsv_m


def reference(deltas: list, fraction=None):
    """The reference code's steps (compute_and_sum_svd_mem_reduction), float64: the kept factors placed in
    zero-padded full-size matrices, each orthogonalised as u @ vh of its SVD."""
    T = len(deltas)
    share = 1 / T if fraction is None else fraction
    for i, d in enumerate(deltas):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_vh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
        r = max(1, int(s.shape[0] * share))
        sum_u[:, i * r:(i + 1) * r] = u[:, :r]
        sum_s[i * r:(i + 1) * r] = s[:r]
        sum_vh[i * r:(i + 1) * r] = vh[:r]
    u_u, _, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, vh_v = torch.linalg.svd(sum_vh, full_matrices=False)
    return torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_v, vh_v))


@pytest.mark.parametrize("shape,tasks,fraction", [((24, 40), 3, None), ((40, 24), 2, None), ((32, 32), 4, 0.1)])
def test_merged_delta_is_the_reference(shape, tasks, fraction):
    deltas = random_deltas(shape, tasks)
    got = tsv_m.merged_delta([d.float() for d in deltas], fraction).double()
    want = reference(deltas, fraction)
    assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 1e-5


def test_the_kept_directions_are_orthonormal_and_keep_the_task_spectra():
    deltas = random_deltas((30, 20), 2)
    merged = tsv_m.merged_delta([d.float() for d in deltas]).double()
    s = torch.linalg.svdvals(merged)
    kept = torch.cat([torch.linalg.svdvals(d)[:10] for d in deltas]).sort(descending=True).values
    assert torch.allclose(s, kept, rtol=1e-5)  # orthonormal U and V: the singular values are the kept ones


def test_recipe_on_the_family_is_the_formula_tensor_by_tensor(family, tmp_path):
    out, inputs = run_merge(tmp_path, family, "{method: tsv_m, base: base, models: [lang, task, en], "
                                              "parameters: {alpha: 0.7}}")
    matrices = 0
    for name, t in out.items():
        base, deltas = task_vectors(inputs[name])
        if t.ndim == 2 and block(name) is not None:  # models that left the matrix unchanged are not its tasks
            tasks = [d for d in deltas if d.abs().max() > 0]
            matrices += any(d.abs().max() == 0 for d in deltas)
            delta = reference(tasks)
        else:  # 1-D tensors, embeddings and lm_head: the mean of the task vectors
            delta = sum(deltas) / len(deltas)
        want = base + 0.7 * delta
        assert t.dtype == torch.bfloat16, name
        assert close_in_bfloat16(t, want, delta), name
    assert matrices == 7 * LAYERS


@pytest.mark.parametrize("merge,where,message", [
    ("{method: tsv_m, base: base, models: [lang], parameters: {alpah: 1}}", "operations.0.merge.parameters.alpah",
     "unknown parameter 'alpah' for merge method 'tsv_m'; did you mean 'alpha'?"),
    ("{method: tsv_m, base: base, models: [lang], parameters: {rank_fraction: lots}}",
     "operations.0.merge.parameters", "bad parameter value for tensor"),
    ("{method: tsv_m, models: [lang, task]}", "operations.0.merge.base", "requires a base input"),
])
def test_bad_parameters_are_one_line_naming_the_yaml_path(family, tmp_path, merge, where, message):
    msg = error_of(tmp_path, family, merge)
    assert len(msg.splitlines()) == 1 and f": {where}: " in msg and message in msg, msg
