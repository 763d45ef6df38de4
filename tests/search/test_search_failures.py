"""`surgery search` when trials fail: exit 1 with the count and the most common error, and an early stop
when the first trials fail with one error that does not depend on their values (docs/search.md)."""

import json

import pytest
from helpers import run_cli

import surgery
from surgery.search.failures import FailureWatch, failure, names_value


def write_search(tmp_path, family, swap: str, trials: int, sampler: str = "random"):
    (tmp_path / "t.txt").write_text("some text\nmore text here\n")
    path = tmp_path / "search.yaml"
    path.write_text(f"""\
recipe:
  inputs: {{base: {family['base']}, lang: {family['lang']}}}
  recipient: base
  operations:
    - layer_swap: {{donor: lang, {swap}}}
objective:
  - {{data: t.txt, metric: perplexity, weight: -1}}
trials: {trials}
sampler: {sampler}
""")
    return path


@pytest.mark.slow
def test_a_missing_tokenizer_stops_the_search_after_three_trials(family, tmp_path):
    """The tiny models have no tokenizer: every trial would fail the same way, whatever its values."""
    path = write_search(tmp_path, family, "bottom: 2, top: 2, embeddings: {choice: [recipient, donor]}", trials=20)
    error = f"{family['base']}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...); pass --tokenizer DIR"
    r = run_cli("search", path, "-o", tmp_path / "out", "-q")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == ("error: no trial completed: the search stopped after 3 trials, which all failed with the same "
                        f"error, one that names none of their values, so every trial would fail: {error} "
                        f"(every trial: {tmp_path / 'out' / 'trials.csv'})\n")
    rows = json.loads((tmp_path / "out" / "trials.json").read_text())["trials"]
    assert [(r["state"], r["error"]) for r in rows] == [("fail", error)] * 3
    assert not (tmp_path / "out" / "best.yaml").exists()
    # --json reports it too, and exits 1; the resumed study stops after three more
    r = run_cli("search", path, "-o", tmp_path / "out", "--json")
    assert r.returncode == 1 and r.stderr.startswith("error: no trial completed: the search stopped after 6 trials")
    data = json.loads(r.stdout)
    assert (data["complete"], data["evaluated"], data["stopped_early"], len(data["trials"])) == (0, 3, True, 6)
    assert data["failure"] == r.stderr.removeprefix("error: ").split(" (every trial: ")[0]
    assert data["best"] is None and data["best_recipe"] is None


def test_errors_that_name_the_trial_values_spend_the_budget(family, tmp_path):
    """Every point is out of range, and each message names its values: another point might have worked,
    so the search runs every trial, then exits 1 with the count and the most common error."""
    path = write_search(tmp_path, family, "bottom: {int: [9, 11]}, top: {choice: [1, 2]}", trials=6, sampler="grid")
    r = run_cli("search", path, "-o", tmp_path / "out", "--json")
    assert r.returncode == 1
    data = json.loads(r.stdout)
    assert (data["complete"], data["evaluated"], data["stopped_early"], len(data["trials"])) == (0, 6, False, 6)
    errors = [row["error"] for row in data["trials"]]
    assert all("layers exceed the model's 8 layers" in e for e in errors) and len(set(errors)) == 6
    first = errors[0]  # six different messages: the first of the most common (once each)
    assert data["failure"] == f"no trial completed: all 6 trials failed, 1 of them with: {first}"
    assert r.stderr == f"error: {data['failure']} (every trial: {tmp_path / 'out' / 'trials.csv'})\n"
    result = surgery.search(path, tmp_path / "out")  # the Python API: the same line, nothing raised
    assert result.failure == data["failure"] and result.evaluated == 0 and result.best is None


class Spec:
    """The part of a search spec FailureWatch reads: variables with names and values."""

    def __init__(self, *variables):
        self.variables = variables


class Var:
    def __init__(self, name, choices=None):
        self.name, self.choices = name, choices

    def param_names(self):
        return [self.name]

    def value(self, sampled):
        return self.choices[sampled] if self.choices else sampled


def test_the_early_stop_rule():
    spec = Spec(Var("w"), Var("op", choices=[{"take": {"from": "a"}}, {"take": {"from": "zeta"}}]))
    same = "data.txt: cannot read: permission denied"
    watch = FailureWatch(spec)
    for i, w in enumerate([0.25, 0.5, 0.75]):
        assert watch.stop is None
        watch.failed(same, {"w": w, "op": i % 2})
    assert watch.stop == same
    # a message that names a value (a float as written, a string inside a chosen mapping) never stops
    for message in ("weight 0.5 is out of range", "no input 'zeta'"):
        watch = FailureWatch(spec)
        for w in (0.25, 0.5, 0.75):
            watch.failed(message, {"w": w, "op": 1})
        assert watch.stop is None
    # two different errors, or a completed trial first: the rule cannot hold any more in this run
    watch = FailureWatch(spec)
    for message in (same, "other", same, same, same):
        watch.failed(message, {"w": 0.3, "op": 0})
    assert watch.stop is None
    watch = FailureWatch(spec)
    watch.completed()
    for _ in range(3):
        watch.failed(same, {"w": 0.3, "op": 0})
    assert watch.stop is None
    assert names_value("bottom 12 + top 2 layers", 12) and not names_value("bottom 12 + top 2 layers", 1)
    assert not names_value("/runs/h1/model.2b: missing", 2) and names_value("t=0.5.", 0.5)
    assert names_value("normalize is False", False) and not names_value("x", None)


@pytest.mark.parametrize("rows, expected", [
    ([], None),
    ([{"state": "complete"}, {"state": "fail", "error": "e"}], None),
    ([{"state": "fail", "error": "a"}, {"state": "fail", "error": "b"}, {"state": "fail", "error": "b"}],
     "no trial completed: all 3 trials failed, 2 of them with: b"),
])
def test_the_failure_line(rows, expected):
    assert failure(rows) == expected
