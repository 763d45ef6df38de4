"""surgery.merge.table: which backend computes a node at each level, `--backend`, `surgery backends`."""

import json

import pytest
from helpers import load, raw_bytes, run_cli

import surgery
from surgery.core.devices import use_backend
from surgery.merge import native
from surgery.merge.table import LEVELS, choose, describe


def node(method, n_models=2, **shared):
    ids = [f"m{i}" for i in range(n_models)] + (["base"] if method != "linear" else [])
    per_input = {i: {"weight": 0.5, "density": 0.5} for i in ids[:n_models]}
    return {"method": method, "ids": ids, "base_index": n_models if method != "linear" else None,
            "shared": shared, "per_input": per_input, "dtype": None, "kernel": shared.pop("kernel", "exact")}


@pytest.mark.parametrize("level", list(LEVELS))
def test_each_level_picks_the_first_row_it_allows(level):
    built = native.built("_elementwise") is not None and native.built("_introsort") is not None
    with use_backend(level):
        picked = {m: choose(node(m), ["BF16"] * 3).name for m in ("linear", "task_arithmetic", "ties")}
        fast = choose(node("ties", kernel="fast"), ["BF16"] * 3)
        torch_path = choose(node("ties"), ["BF16"] * 3, host=False).name
        cuda = choose(node("task_arithmetic"), ["BF16"] * 3, "cuda").name
    first = {"auto": "compiled" if built else "numpy", "numpy": "numpy", "torch": "torch", "mergekit": "mergekit"}
    want_ties = {"auto": "compiled" if built else "torch", "numpy": "torch", "torch": "torch", "mergekit": "mergekit"}
    assert picked == {"linear": first[level], "task_arithmetic": first[level], "ties": want_ties[level]}
    assert fast.name == ("mergekit" if level == "mergekit" else "torch")
    assert fast.exact.startswith("not bitwise") == (level != "mergekit")  # the fast kernel states its contract
    assert torch_path == ("mergekit" if level == "mergekit" else "torch")
    assert cuda == ("mergekit" if level == "mergekit" else "torch")  # host backends are CPU only


def test_rows_are_refused_by_their_conditions():
    assert choose(node("task_arithmetic", n_models=5), ["BF16"] * 6).name == "torch"  # > 4 terms: pairwise sums
    assert choose(node("ties", rescale=True), ["BF16"] * 3).name == "torch"
    assert choose(node("linear"), ["F64"] * 3).name == "torch"  # no host backend computes float64
    assert choose({**node("linear"), "vocab": object()}, ["BF16"] * 3).name == "torch"  # union vocabularies
    assert choose(node("della"), ["BF16"] * 3).name == "mergekit"  # methods without backends of their own


def test_backend_levels_write_the_same_bytes(family, tmp_path):
    recipe = {"inputs": {k: str(v) for k, v in family.items()}, "recipient": "task",
              "operations": [{"merge": {"method": "ties", "base": "en",
                                        "models": {"lang": {"weight": 0.6, "density": 0.5},
                                                   "task": {"weight": 0.4, "density": 0.7}}}}]}
    outs = {}
    for level in LEVELS:
        surgery.run(recipe, tmp_path / level, backend=level)
        outs[level] = load(tmp_path / level)
    want = outs["mergekit"]
    for level, got in outs.items():
        assert got.keys() == want.keys() and all(raw_bytes(got[n]) == raw_bytes(want[n]) for n in want), level


def test_a_bad_backend_is_one_line(family, tmp_path, monkeypatch):
    r = run_cli("run", "recipes/layer_swap.yaml", "-o", tmp_path / "o", "--backend", "gpu")
    assert r.returncode == 2 and "'gpu' is not one of" in r.stderr
    with pytest.raises(surgery.SurgeryError, match=r"^backend: unknown backend 'fast' \(expected one of: auto, "):
        surgery.run({"inputs": {"a": str(family["en"])}, "recipient": "a"}, tmp_path / "x", backend="fast")
    monkeypatch.setenv("SURGERY_BACKEND", "nope")
    with pytest.raises(surgery.SurgeryError, match="^SURGERY_BACKEND: unknown backend 'nope'"):
        choose(node("linear"), ["BF16"] * 3)
    assert not (tmp_path / "x").exists()


def test_surgery_backends_prints_the_table():
    r = run_cli("backends", "--json")
    assert r.returncode == 0
    rows = json.loads(r.stdout)
    assert rows == json.loads(json.dumps(describe()))
    assert {(x["method"], x["backend"]) for x in rows} >= {("linear", "compiled"), ("linear", "numpy"),
                                                          ("ties", "torch"), ("any other", "mergekit")}
    text = run_cli("backends").stdout.splitlines()
    assert text[0].split()[:3] == ["method", "backend", "dtypes"] and len(text) == len(rows) + 1


def test_surgerys_own_methods_have_no_mergekit_row_and_are_listed():
    from surgery.merge import table

    own = ("tsv_m", "iso_c", "iso_cts", "lines", "consensus")
    for method in own:
        assert [b.name for b in table.rows(method)] == ["torch"], method
        assert table.choose({"method": method, "dtype": None, "shared": {}}, ["BF16"]).method == method
    assert table.rows("ties")[-1].name == "mergekit"
    listed = {r["method"]: r["backend"] for r in table.describe()}
    assert all(listed[m] == "torch" for m in own)
    assert [b.wraps for m in own for b in table.rows(m)] == [False, False, False, True, True]


def test_backend_mergekit_still_computes_surgerys_own_methods_and_their_base_by_mergekit(monkeypatch):
    from surgery.core import devices
    from surgery.merge import table

    monkeypatch.setattr(devices, "backend", lambda: "mergekit")
    assert table.choose({"method": "tsv_m", "dtype": None, "shared": {}}, ["BF16"]).name == "torch"
    assert table.choose({"method": "ties", "dtype": None, "shared": {}}, ["BF16"]).name == "mergekit"
