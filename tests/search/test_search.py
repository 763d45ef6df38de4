"""`surgery search`: a known optimum found by grid and TPE, resume after SIGKILL, Ray = serial, bad files.

The objective's optimum is known by construction: the text is sampled from the model that a layer
swap with bottom=2, top=2 produces (math expert + Swahili expert of the demo, lm_head sharpened so
the models are far from uniform, with a word-level tokenizer so sampled token ids are the text
exactly). The expected negative log-likelihood of a model on samples of q is smallest at q.

Here: resume after SIGKILL and failing searches; the optimum, TPE and Ray: test_search_optimum.py; spaces:
test_search_spaces.py; mergekit-evolve configs: test_search_evolve.py; the shared worlds: conftest.py.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_cli
from search_kit import SMALL, by_config, swap_search, write_search

import surgery
from surgery.errors import RecipeError

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- resume

@pytest.mark.slow
def test_sigkill_mid_search_then_rerun_equals_an_uninterrupted_run(swap_world, grid_run, tmp_path):
    root, _ = swap_world
    search_file = swap_search(root, trials=6, swap=SMALL, name="small.yaml")
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "surgery", "search", str(search_file), "-o", str(out), "-q"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_before, deadline = [], time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
            if not (out / "study.db").exists():
                continue
            try:
                with sqlite3.connect(out / "study.db") as db:  # (state, signed: its recipe is being evaluated)
                    states = db.execute("SELECT number, state, EXISTS(SELECT 1 FROM trial_user_attributes a WHERE "
                                        "a.trial_id = t.trial_id AND a.key = 'hash') FROM trials t ORDER BY number"
                                        ).fetchall()
            except sqlite3.OperationalError:
                continue  # tables not created yet, or locked
            if sum(s == "COMPLETE" for _, s, _ in states) >= 2 and states[-1][1:] == ("RUNNING", 1):
                proc.send_signal(signal.SIGKILL)  # in the trial's evaluation (or, rarely, already in the next ask)
                proc.wait()
                done_before = [n for n, s, _ in states if s == "COMPLETE"]
                break
    finally:
        if proc.poll() is None:
            proc.kill()
    assert done_before, f"the search was not caught mid-way: {proc.stderr.read().decode()[-500:]}"
    import optuna

    killed = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}").trials
    before = {t.number: t.value for t in killed if t.state.name == "COMPLETE"}  # as the kill left them
    interrupted = [t for t in killed if t.state.name == "RUNNING"]
    assert len(interrupted) == 1 and len(before) >= 2
    result = surgery.search(search_file, out)
    assert result.evaluated == 6 - len(before)       # nothing finished is evaluated again; the interrupted one is
    assert {r["trial"]: r["value"] for r in result.trials if r["trial"] in before} == before
    assert interrupted[0].number not in {r["trial"] for r in result.trials}
    reference = by_config(grid_run.trials)             # the uninterrupted run's values for the same configurations
    assert len(result.trials) == 6 and by_config(result.trials) == pytest.approx(
        {k: reference[k] for k in by_config(result.trials)}) and len(by_config(result.trials)) == 6
    redone = [t for t in optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}").trials
              if t.user_attrs.get("redo_of") == interrupted[0].number]
    if "grid_id" not in interrupted[0].system_attrs:  # killed inside ask() before the grid sampler gave it a
        assert redone == []                           # point: nothing to redo, the grid samples that point anew
        return
    assert len(redone) == 1 and redone[0].state.name == "COMPLETE"
    # a kill inside ask() leaves none or some of the parameters: the redo runs the whole grid point
    assert interrupted[0].params.items() <= redone[0].params.items() and len(redone[0].params) == 2



# ---------------------------------------------------------------------------- bad search files

BAD = {
    "float where the schema takes an int": ("bottom: {float: [0, 2]}, top: 1", "recipe.operations.0.layer_swap.bottom",
                                            "the float variable's value 0.74 is not valid here: Input should be a "
                                            "valid integer"),
    "choice outside a literal": ("layers: {choice: ['0-1', 3]}, embeddings: {choice: [donor, nowhere]}",
                                 "recipe.operations.0.layer_swap.embeddings",
                                 "the choice variable's value 'nowhere' is not valid here"),
    "empty range": ("bottom: {int: [3, 1]}", "recipe.operations.0.layer_swap.bottom", "empty range [3, 1]"),
    "empty choice": ("bottom: {choice: []}", "recipe.operations.0.layer_swap.bottom", "empty choice"),
    "unknown variable key": ("bottom: {int: [0, 3], scale: log}", "recipe.operations.0.layer_swap.bottom",
                             "unknown key 'scale' in a search variable"),
    "float grid without a step": ("bottom: 1, embeddings: {float: [0, 1]}", "recipe.operations.0.layer_swap.embeddings",
                                  "the grid sampler needs a step"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_variables_are_one_line_with_file_and_line(swap_world, case):
    root, _ = swap_world
    swap, where, message = BAD[case]
    path = swap_search(root, swap=swap)
    r = run_cli("search", path, "-o", root / "never")
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {path}:5: {where}: ") and message in r.stderr, r.stderr
    assert not (root / "never").exists()


@pytest.mark.parametrize("extra,where,message", [
    ("objective:\n  - {data: gen.txt, metric: perplexty}", ":10: objective.0", "unknown metric 'perplexty'; did you "
                                                                               "mean 'perplexity'?"),
    ("objective:\n  - {data: gen.txt, metric: acc}", ":10: objective.0", "metric acc needs choice data; gen.txt holds "
                                                                         "text data"),
    ("objective:\n  - {data: nothing.txt, metric: perplexity}", ":10: objective.0", "data file not found"),
    ("trials: {int: [1, 5]}", ":10: trials", "search variables go inside the recipe"),
    ("eval: {batch: 4}", ":10: eval.batch", "unknown eval option 'batch'; did you mean 'batch_size'?"),
    ("samplr: tpe", ":11: samplr", "unknown key 'samplr'; did you mean 'sampler'?"),
])
def test_bad_settings_are_one_line_with_file_and_line(swap_world, extra, where, message):
    root, _ = swap_world
    text = swap_search(root).read_text()
    for key in ("objective", "trials", "eval"):  # replace the setting the case gives
        if extra.startswith(key + ":"):
            text = "\n".join(line for line in text.splitlines() if not line.startswith(key) and
                             not (key == "objective" and line.startswith("  - {data"))) + "\n"
    path = write_search(root, "bad.yaml", text + extra + "\n")
    with pytest.raises(RecipeError) as e:
        surgery.load_search(path)
    assert str(e.value).startswith(f"{path}{where}") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_cli_json_and_storage_url(swap_world, tmp_path):
    root, _ = swap_world
    db = tmp_path / "elsewhere.db"
    r = run_cli("search", swap_search(root, "random", trials=1), "-o", tmp_path / "out", "--storage",
                f"sqlite:///{db}", "--json", "--seed", "3")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["format"] == "surgery.search/1" and len(data["trials"]) == 1
    assert data["storage"].endswith("elsewhere.db")
    assert db.exists() and not (tmp_path / "out" / "study.db").exists()
    assert (tmp_path / "out" / "best.yaml").exists()
    # the live table: a header, then one line per finished trial (here the second, resumed with a new budget)
    r = run_cli("search", swap_search(root, "random", trials=1), "-o", tmp_path / "out", "--storage",
                f"sqlite:///{db}", "--seed", "3", "--trials", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["trial", "value", "best"] and lines[0].split()[3:5] == ["bottom", "top"]
    row = lines[1].split()
    trial = json.loads((tmp_path / "out" / "trials.json").read_text())["trials"][1]
    assert row[0] == "1" and float(row[1]) == pytest.approx(trial["value"], rel=1e-4)
    assert row[3:5] == [str(trial["operations.0.layer_swap.bottom"]), str(trial["operations.0.layer_swap.top"])]
    assert lines[2].startswith("2 trials (2 complete, 1 evaluated now)") and "best: trial" in lines[3]


def test_bad_storage_url_and_grid_override_are_one_line(swap_world, tmp_path):
    root, _ = swap_world
    r = run_cli("search", swap_search(root), "-o", tmp_path / "a", "--storage", "nosuchdb://x/y")
    assert r.returncode == 1 and r.stderr.startswith("error: cannot open the study store 'nosuchdb://x/y'"), r.stderr
    assert r.stderr.count("\n") == 1
    path = swap_search(root, "tpe", swap="bottom: 2, embeddings: {float: [0, 1]}", name="float.yaml")
    r = run_cli("search", path, "-o", tmp_path / "b", "--sampler", "grid")
    assert r.returncode == 1 and "the grid sampler needs a step for a float variable" in r.stderr, r.stderr


def test_a_trial_killed_before_the_grid_gave_it_a_point_is_not_redone(swap_world, tmp_path):
    """ask() creates the trial, then the grid sampler gives it a point: a kill in between leaves a RUNNING trial
    with nothing to redo. It is marked interrupted, nothing is queued, and the next trial gets a grid point anew."""
    from surgery.search.study import count_finished, open_study, redo_interrupted

    root, _ = swap_world
    spec = surgery.load_search(swap_search(root))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(spec, storage)
    number = study._storage.get_trial(study._storage.create_new_trial(study._study_id)).number
    resumed = open_study(spec, storage)
    assert redo_interrupted(resumed) == [number] and count_finished(resumed) == 0
    nxt = resumed.ask(fixed_distributions=spec.distributions())
    assert "redo_of" not in nxt.user_attrs and set(nxt.params) == set(spec.param_names())
    assert "grid_id" in resumed._storage.get_trial(nxt._trial_id).system_attrs


@pytest.mark.parametrize("sampled", [0, 1], ids=["before-sampling", "mid-sampling"])
def test_a_trial_killed_inside_ask_is_redone_at_its_whole_grid_point(swap_world, tmp_path, sampled):
    """ask() creates the trial and the grid sampler gives it a grid point before the parameters are sampled
    one by one and the trial is signed: a kill in that window leaves an unsigned RUNNING trial with none or
    some of its parameters, which the next run redoes with all of them (CI caught the mid-sampling kill)."""
    from surgery.search.study import open_study, redo_interrupted

    root, _ = swap_world
    spec = surgery.load_search(swap_search(root))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(spec, storage)
    trial = study.ask()  # a RUNNING trial with a grid id and no parameters yet
    for name in spec.param_names()[:sampled]:
        trial._suggest(name, spec.distributions()[name])
    assert len(study._storage.get_trial(trial._trial_id).params) == sampled
    grid_id = study._storage.get_trial(trial._trial_id).system_attrs["grid_id"]
    resumed = open_study(spec, storage)  # as a new process would open it: the same grid order
    point = resumed.sampler.point(grid_id)
    assert point == study.sampler.point(grid_id) and set(point) == set(spec.param_names())
    assert redo_interrupted(resumed) == [trial.number]
    queued = resumed.ask(fixed_distributions=spec.distributions())
    assert queued.params == point and queued.user_attrs["redo_of"] == trial.number
