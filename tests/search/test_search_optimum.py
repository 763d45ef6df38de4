"""`surgery search` finds the known optimum (see test_search.py): grid, TPE within budget, its outputs, a rerun
that evaluates nothing, and Ray workers that match the serial run."""

import json
import math

import pytest
import torch
from search_kit import SMALL, by_config, nll_by_hand, swap_recipe, swap_search

import surgery

# ---------------------------------------------------------------------------- the known optimum

def test_grid_finds_the_known_optimum(swap_world, grid_run):
    root, docs = swap_world
    result = grid_run
    assert len(result.trials) == 16 and result.evaluated == 16
    assert all(r["state"] == "complete" for r in result.trials)
    best = result.best
    assert (best["operations.0.layer_swap.bottom"], best["operations.0.layer_swap.top"]) == (2, 2)
    # every value is -perplexity, the generator's measured independently with transformers
    assert best["value"] == pytest.approx(-math.exp(nll_by_hand(root / "generator", docs)), rel=1e-5)
    assert best["gen.txt:perplexity"] == pytest.approx(-best["value"])
    values = sorted(r["value"] for r in result.trials)
    assert values[-1] > values[-2]  # a unique optimum
    # best.yaml is a plain recipe that `surgery run` takes; --write-best wrote the generator's bytes
    assert result.best_recipe == json.loads(json.dumps(swap_recipe(root, 2, 2) | {
        "inputs": {"math": "math", "sw": "swahili"}}))
    from safetensors.torch import load_file

    gen = load_file(root / "generator" / "model.safetensors")
    for out in (result.output / "best", surgery.run(result.output / "best.yaml", result.output / "rerun").output):
        got = load_file(out / "model.safetensors")
        assert got.keys() == gen.keys() and all(torch.equal(got[k], gen[k]) for k in gen)


def test_outputs_table_json_plots(grid_run):
    out = grid_run.output
    import csv

    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert [int(r["trial"]) for r in rows] == list(range(16))
    assert {"operations.0.layer_swap.bottom", "operations.0.layer_swap.top", "gen.txt:perplexity",
            "hash"} <= set(rows[0])
    data = json.loads((out / "trials.json").read_text())
    assert data["format"] == "surgery.search/1" and data["best"]["trial"] == grid_run.best["trial"]
    assert [r["value"] for r in data["trials"]] == [float(r["value"]) for r in rows]
    for png in ("objective.png", "importance.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    importance = json.loads((out / "importance.json").read_text())
    assert set(importance) == {"operations.0.layer_swap.bottom", "operations.0.layer_swap.top"}
    assert sum(importance.values()) == pytest.approx(1.0)


def test_rerun_of_a_finished_search_evaluates_nothing(swap_world, grid_run):
    root, _ = swap_world
    again = surgery.search(swap_search(root), grid_run.output)
    assert again.evaluated == 0 and by_config(again.trials) == by_config(grid_run.trials)


@pytest.mark.slow
def test_tpe_finds_the_optimum_within_budget(swap_world, grid_run, tmp_path):
    root, _ = swap_world
    result = surgery.search(swap_search(root, "tpe", trials=20), tmp_path)
    assert len(result.trials) == 20
    best = result.best
    assert (best["operations.0.layer_swap.bottom"], best["operations.0.layer_swap.top"]) == (2, 2)
    assert best["value"] == pytest.approx(grid_run.best["value"], rel=1e-9)
    # repeated configurations were measured once: the cache gives them the first value, so TPE's
    # 20 trials measured fewer configurations than the grid's 16
    cached = [r for r in result.trials if r["cached_from"] is not None]
    assert result.evaluated == 20 - len(cached) == len({r["hash"] for r in result.trials}) < 16
    for r in cached:
        assert r["value"] == result.trials[r["cached_from"]]["value"]



@pytest.mark.slow
def test_ray_with_two_workers_matches_serial(swap_world, grid_run, tmp_path):
    root, _ = swap_world
    result = surgery.search(swap_search(root, trials=6, swap=SMALL, name="small-ray.yaml"), tmp_path, workers=2)
    reference = by_config(grid_run.trials)
    got = by_config(result.trials)
    assert result.evaluated == 6 == len(got) and got == pytest.approx({k: reference[k] for k in got}, rel=1e-9)
    assert result.best["trial"] in {r["trial"] for r in result.trials}
    import ray

    assert not ray.is_initialized()  # the local Ray started for the search is shut down
