"""One model per worker, patched between trials, and pruning on growing subsets of the data."""

import csv

import pytest
import torch
from search_kit import SMALL, by_config, swap_recipe, swap_search, write_search

import surgery
from surgery.errors import RecipeError
from surgery.models import load_model
from surgery.pipeline import build_plan
from surgery.search.resident import ResidentModel


def blend(root, a: float):
    r = swap_recipe(root, 1, 1)
    r["operations"] = [{"arithmetic": {"expr": f"{a}*math + {1 - a}*sw", "select": {"modules": ["mlp"]}}}]
    return r


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def differing(a: dict, b: dict) -> set:
    return {k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])}


def test_patched_model_equals_a_fresh_load_over_a_sequence_of_trials(swap_world):
    root, _ = swap_world
    trials = [swap_recipe(root, 3, 1), swap_recipe(root, 1, 1),   # the second changes fewer tensors than the first
              blend(root, 0.25), blend(root, 0.75), swap_recipe(root, 2, 3), swap_recipe(root, 2, 3)]
    resident = ResidentModel(device="cpu", dtype="float32")
    previous = None
    for i, recipe in enumerate(trials):
        model, _ = resident.load(build_plan(recipe))
        got = state(model)
        want = state(load_model(recipe, dtype="float32")[0])
        assert got.keys() == want.keys()
        assert not differing(got, want), (i, sorted(differing(got, want))[:3])
        if previous is None:
            assert resident.patched == len(build_plan(recipe).entries)  # built: every tensor
        else:
            # only what differs from the bytes the model held is computed
            assert resident.patched == len(differing(previous, want)), i
        previous = want
    assert resident.patched == 0  # the same recipe twice: nothing to compute


@pytest.mark.slow
def test_pruned_grid_finds_the_same_optimum_and_records_fidelity(swap_world, grid_run, tmp_path):
    root, _ = swap_world
    path = swap_search(root, name="pruned.yaml", extra="pruner: median\nfidelity: [0.25, 0.5, 1]\n")
    result = surgery.search(path, tmp_path)
    states = [r["state"] for r in result.trials]
    assert len(result.trials) == 16 and "pruned" in states and "complete" in states
    assert result.best_value == pytest.approx(grid_run.best_value, rel=1e-9)
    key = [k for k in result.best if k.startswith("operations.")]
    assert [result.best[k] for k in key] == [grid_run.best[k] for k in key] == [2, 2]
    full = by_config(grid_run.trials)
    for config, value in by_config(result.trials).items():  # complete trials: the full evaluation's value
        assert value == pytest.approx(full[config], rel=1e-9)
    with open(tmp_path / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["fidelity"] for r in rows if r["state"] == "complete"} == {"1.0"}
    assert {r["fidelity"] for r in rows if r["state"] == "pruned"} <= {"0.25", "0.5"}
    # a pruned trial's value is the objective on the subset it reached: worse than the best's
    assert all(r["value"] < result.best_value for r in result.trials if r["state"] == "pruned")


@pytest.mark.slow
def test_a_pruned_trial_is_not_redone_on_resume(swap_world, tmp_path):
    root, _ = swap_world
    extra = "pruner: median\nfidelity: [0.25, 1]\n"
    first = surgery.search(swap_search(root, trials=8, name="resume.yaml", extra=extra), tmp_path)
    pruned = {r["hash"] for r in first.trials if r["state"] == "pruned"}
    assert pruned and first.evaluated == 8
    second = surgery.search(swap_search(root, trials=16, name="resume.yaml", extra=extra), tmp_path)
    assert second.evaluated == 8  # only the new grid points
    assert [r for r in second.trials if r["hash"] in pruned] == [r for r in first.trials if r["hash"] in pruned]


@pytest.mark.slow
def test_ray_actors_keep_their_model_and_prune(swap_world, grid_run, tmp_path):
    pytest.importorskip("ray")
    root, _ = swap_world
    extra = "pruner: median\nfidelity: [0.5, 1]\n"
    result = surgery.search(swap_search(root, trials=6, swap=SMALL, name="ray-pruned.yaml", extra=extra), tmp_path,
                            workers=2)
    full = by_config(grid_run.trials)
    assert len(result.trials) == 6
    for config, value in by_config(result.trials).items():
        assert value == pytest.approx(full[config], rel=1e-9)


@pytest.mark.parametrize("extra,where,message", [
    ("fidelity: [0.5, 0.25, 1]", ":11: fidelity", "expected increasing fractions in (0, 1] ending at 1"),
    ("fidelity: [0.25, 0.5]", ":11: fidelity", "expected increasing fractions in (0, 1] ending at 1"),
    ("pruner: median\nfidelity: [1]", ":11: pruner", "pruner median needs at least two fidelity steps"),
    ("pruner: medain", ":11: pruner", "Input should be 'none', 'median', 'halving' or 'hyperband'"),
])
def test_bad_pruning_settings_are_one_line_with_file_and_line(swap_world, extra, where, message):
    root, _ = swap_world
    path = write_search(root, "bad-pruning.yaml", swap_search(root).read_text() + extra + "\n")
    with pytest.raises(RecipeError) as e:
        surgery.load_search(path)
    assert str(e.value).startswith(f"{path}{where}") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_lm_eval_terms_refuse_fidelity_steps(swap_world):
    root, _ = swap_world
    text = swap_search(root).read_text().replace("{data: gen.txt, metric: perplexity, weight: -1}",
                                                 "{lm_eval: arc_easy, metric: acc}")
    path = write_search(root, "bad-lm-eval.yaml", text + "fidelity: [0.5, 1]\n")
    with pytest.raises(RecipeError) as e:
        surgery.load_search(path)
    assert str(e.value).startswith(f"{path}:11: fidelity") and "an lm_eval term is measured whole" in str(e.value)


def test_fidelity_steps_add_up_to_the_whole_evaluation(swap_world):
    from surgery.eval import metrics
    from surgery.eval.data import load_dataset
    from surgery.search.fidelity import Totals, fidelity_steps, measure_part

    root, _ = swap_world
    ds = load_dataset("gen", root / "gen.txt")
    steps = fidelity_steps([ds], [0.25, 0.5, 1], seed=3)
    parts = [part[0].items for part in steps]
    assert [len(p) for p in parts] == [4, 4, 8]
    assert sorted(d for p in parts for d in p) == sorted(ds.items)  # every item once
    assert fidelity_steps([ds], [0.25, 0.5, 1], seed=3)[0][0].items == parts[0]  # the same items for every trial
    model, tok = load_model(root / "generator", dtype="float32")
    totals = Totals()
    totals.add(measure_part(model, tok, steps[0], {}))
    assert totals.metrics()["gen"] == pytest.approx(metrics.perplexity(model, tok, parts[0]), rel=1e-12)
    for part in steps[1:]:
        totals.add(measure_part(model, tok, part, {}))
    assert totals.metrics()["gen"] == pytest.approx(metrics.perplexity(model, tok, ds.items), rel=1e-9)
