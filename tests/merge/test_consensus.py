"""consensus (TALL masks): entries at least k tasks' masks keep, |tau_t| >= lambda |tau_MTL - tau_t|, take the base
method's merge; the others the base."""

from __future__ import annotations

import pytest
import torch
from own_methods import MODELS, error_of, random_deltas, run_merge

from helpers import raw_bytes
from surgery.merge.consensus import consensus_mask


def mask_by_hand(deltas, lam, k):
    """The paper's masks, entry by entry in float64."""
    mtl = sum(deltas)
    votes = sum((d.abs() >= lam * (mtl - d).abs()).long() for d in deltas)
    return votes >= k


@pytest.mark.parametrize("lam,k", [(0.4, 2), (0.6, 1), (0.2, 3)])
def test_the_mask_is_the_papers(lam, k):
    deltas = random_deltas((64, 48), 3)
    got = consensus_mask([d.float() for d in deltas], lam, k)
    want = mask_by_hand(deltas, lam, k)
    assert 0 < int(want.sum()) < want.numel()  # the mask keeps some entries and drops others
    # float32 and float64 may differ only where the two sides are equal to float32 precision
    mtl = sum(deltas)
    near = [(d.abs() - lam * (mtl - d).abs()).abs() < 1e-5 * d.abs().max() for d in deltas]
    differs = got != want
    assert not (differs & ~torch.stack(near).any(0)).any()


def test_a_tensor_only_one_task_changed_is_the_base_at_k_2():
    tau = torch.randn(8, 8)
    assert not consensus_mask([tau, torch.zeros(8, 8)], 0.5, 2).any()
    assert consensus_mask([tau, torch.zeros(8, 8)], 0.5, 1).equal(tau != 0)


def mergekit(method, inputs: dict, **parameters):
    from mergekit.merge_methods.api import merge_tensors

    return merge_tensors([inputs[m] for m in (*MODELS, "base")], method, parameters=parameters,
                         base_index=len(MODELS))


@pytest.mark.parametrize("base_method", ["task_arithmetic", "ties"])
def test_recipe_on_the_family_is_the_masked_base_method(family, tmp_path, base_method):
    out, inputs = run_merge(tmp_path, family, "{method: consensus, base: base, models: {lang: {weight: 1.0}, "
                                              "task: {weight: 0.8}, en: {weight: 1.0}}, parameters: "
                                              f"{{base_method: {base_method}, k: 2, mask_lambda: 0.5}}}}")
    kept = total = 0
    for name, t in out.items():
        x = inputs[name]
        deltas = [x[m].float() - x["base"].float() for m in MODELS]
        mask = mask_by_hand(deltas, 0.5, 2)
        merged = mergekit(base_method, x, weight={0: 1.0, 1: 0.8, 2: 1.0})
        assert raw_bytes(t) == raw_bytes(torch.where(mask, merged, x["base"])), name
        kept, total = kept + int(mask.sum()), total + mask.numel()
    assert 0 < kept < total


@pytest.mark.parametrize("merge,where,message", [
    ("{method: consensus, base: base, models: {lang: {weight: 1}}, parameters: {base_method: dare_ties}}",
     "operations.0.merge.parameters.base_method", "base_method of consensus must be one of task_arithmetic, ties"),
    ("{method: consensus, base: base, models: {lang: {weight: 1}}, parameters: {k: two}}",
     "operations.0.merge.parameters", "bad parameter value for tensor"),
    ("{method: consensus, base: base, models: {lang: {weight: 1, desnity: 1}}}",
     "operations.0.merge.models.lang.desnity", "unknown parameter 'desnity' for merge method 'consensus'; did you "
                                               "mean 'density'?"),
])
def test_bad_parameters_are_one_line_naming_the_yaml_path(family, tmp_path, merge, where, message):
    msg = error_of(tmp_path, family, merge)
    assert len(msg.splitlines()) == 1 and f": {where}: " in msg and message in msg, msg
