"""Analysis-driven recipe operations and the `surgery diff` command."""

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import load, random_state, raw_bytes, save_checkpoint, tiny_config
from analysis_kit import INTER, NEURONS, OUTER, neuron_delta

from surgery.errors import RecipeError, SurgeryError
from surgery.pipeline import run
from surgery.pipeline import build_plan
from surgery.loader import load_recipe


def recipe(ckpts, recipient, ops, **extra):
    text = {"inputs": {n: str(p) for n, p in ckpts.items()}, "recipient": recipient, "operations": ops, **extra}
    return load_recipe(text)


def rows_of(name):
    return 1 if "down_proj" in name else 0  # neuron axis


def test_transplant_writes_exactly_the_neuron_slices(ckpts, tmp_path):
    r = recipe(ckpts, "neu2", [{"transplant_neurons": {"donor": "neu", "neurons": {"base": "base", "top": 3}}}])
    plan = build_plan(r)
    text = plan.format()
    assert "#1 transplant_neurons: 3 neurons in 1 layers from neu (top 3 per layer of neu vs base" in text
    assert "L4: 3 (" in text and "17 (" in text and "40 (" in text
    assert "neu2 with rows 3,17,40 from neu" in text and "neu2 with cols 3,17,40 from neu" in text
    out = load(run(r, tmp_path / "out").output)
    donor, recip = load(ckpts["neu"]), load(ckpts["neu2"])
    moved = 0
    for name, t in out.items():
        if ".layers.4.mlp." in name:
            ax = rows_of(name)
            for j in range(INTER):
                src = donor if j in NEURONS else recip
                assert raw_bytes(t.select(ax, j)) == raw_bytes(src[name].select(ax, j)), (name, j)
            moved += 1
        else:
            assert raw_bytes(t) == raw_bytes(recip[name]), name
    assert moved == 3
    # neuron 17 and 40 of neu2 were overwritten, 50 and 60 kept: the layer differs from both inputs
    g = "model.layers.4.mlp.gate_proj.weight"
    assert not torch.equal(out[g], recip[g]) and not torch.equal(out[g], donor[g])


def test_reset_to_base_undoes_exactly_the_changed_neurons(ckpts, tmp_path):
    r = recipe(ckpts, "neu", [{"reset_neurons": {"to": "base", "neurons": {"top": 3}}}])
    out = load(run(r, tmp_path / "out").output)
    base = load(ckpts["base"])
    assert all(raw_bytes(t) == raw_bytes(base[n]) for n, t in out.items())


def test_zero_neurons_from_a_file(ckpts, tmp_path):
    (tmp_path / "lape.json").write_text(json.dumps({"neurons": {"4": [17, 50]}}))
    yaml = (f"inputs:\n  neu2: {ckpts['neu2']}\noperations:\n"
            "  - reset_neurons: {to: zero, neurons: {file: lape.json}}\n")
    (tmp_path / "r.yaml").write_text(yaml)
    plan = build_plan(load_recipe(tmp_path / "r.yaml"))
    assert "#1 reset_neurons: 2 neurons in 1 layers zeroed (file lape.json)" in plan.format()
    out = load(run(load_recipe(tmp_path / "r.yaml"), tmp_path / "out").output)
    recip = load(ckpts["neu2"])
    for name, t in out.items():
        if ".layers.4.mlp." in name and "weight" in name:
            ax = rows_of(name)
            for j in range(INTER):
                if j in (17, 50):
                    assert not t.select(ax, j).any()
                else:
                    assert raw_bytes(t.select(ax, j)) == raw_bytes(recip[name].select(ax, j))
        else:
            assert raw_bytes(t) == raw_bytes(recip[name])


def test_saved_neuron_set_round_trips_through_cli_and_recipe(ckpts, tmp_path):
    from surgery.cli import cli
    res = CliRunner().invoke(cli, ["diff", str(ckpts["base"]), f"neu={ckpts['neu']}", "-k", "3", "-q",
                                   "--save-neurons", str(tmp_path / "n.json")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "n.json").read_text())
    assert data["format"] == "surgery.neurons/1" and data["neurons"] == {"4": NEURONS}
    a = recipe(ckpts, "lang", [{"transplant_neurons": {"donor": "neu", "neurons": {"file": str(tmp_path / "n.json")}}}])
    b = recipe(ckpts, "lang", [{"transplant_neurons": {"donor": "neu", "neurons": {"base": "base", "top": 3}}}])
    pa, pb = build_plan(a), build_plan(b)
    assert [e.description for e in pa.entries] == [e.description for e in pb.entries]
    import re

    assert re.search(r"L4: 3 \(0\.\d+\), 17 \(0\.\d+\), 40 \(0\.\d+\)", pa.format())  # the file's scores are shown


def test_ranked_layer_swap(ckpts, tmp_path):
    r = recipe(ckpts, "neu2", [{"ranked_layer_swap": {"donor": "lang", "reference": "base", "k": 4}}])
    text = build_plan(r).format()
    assert "#1 ranked_layer_swap: lang vs base by relative, the 4 top-ranked layers: layers 0, 1, 6, 7" in text
    assert "ranking: L" in text and "rank 1 relative" in text
    out = load(run(r, tmp_path / "out").output)
    donor, recip = load(ckpts["lang"]), load(ckpts["neu2"])
    for name, t in out.items():
        swapped = any(f".layers.{i}." in name for i in OUTER)
        assert raw_bytes(t) == raw_bytes((donor if swapped else recip)[name]), name
    outer = recipe(ckpts, "neu2",
                   [{"ranked_layer_swap": {"donor": "lang", "reference": "base", "k": 4, "split": "outer"}}])
    assert "outer split bottom 2 + top 2" in build_plan(outer).format()


def test_explicit_neuron_indices(ckpts, tmp_path):
    """neurons.indices: a list for every layer (or those in `layers`), or {layer: [indices]}."""
    per_layer = recipe(ckpts, "lang",
                       [{"transplant_neurons": {"donor": "neu", "neurons": {"indices": {4: [17, 3], 6: [0]}}}}])
    assert "3 neurons in 2 layers from neu (explicit indices)" in build_plan(per_layer).format()
    out = load(run(per_layer, tmp_path / "a").output)
    flat = recipe(ckpts, "lang", [{"reset_neurons": {"to": "zero", "neurons": {"indices": [3, 17], "layers": "4"}}}])
    zeroed = load(run(flat, tmp_path / "b").output)
    donor, recip = load(ckpts["neu"]), load(ckpts["lang"])
    want = {4: [3, 17], 6: [0]}  # neu differs from lang in layer 4's neurons 3, 17 and in all of layer 6
    for name, t in out.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        idx = want.get(layer) if ".mlp." in name else None
        expect, expect_zero = recip[name].clone(), recip[name].clone()
        if idx:
            sl = (slice(None), idx) if rows_of(name) else (idx, slice(None))
            expect[sl] = donor[name][sl]
            assert not torch.equal(expect, recip[name]), name
            if layer == 4:
                expect_zero[sl] = 0
        assert raw_bytes(t) == raw_bytes(expect), name
        assert raw_bytes(zeroed[name]) == raw_bytes(expect_zero), name


def test_fused_gate_up_transplant(tmp_path):
    cfg = tiny_config("phi3", intermediate_size=INTER)
    base = random_state(cfg, seed=0)
    paths = {"base": save_checkpoint(tmp_path / "b", base, cfg, dtype=torch.bfloat16),
             "ex": save_checkpoint(tmp_path / "e", neuron_delta(base, 2, NEURONS, [0.05] * 3), cfg,
                                   dtype=torch.bfloat16)}
    r = recipe(paths, "base", [{"transplant_neurons": {"donor": "ex", "neurons": {"top": 3}}}])
    out = load(run(r, tmp_path / "out").output)
    ex = load(paths["ex"])
    assert all(raw_bytes(t) == raw_bytes(ex[n]) for n, t in out.items())  # rows j and INTER+j both moved
    assert "rows 3,17,40,67,81,104 from ex" in build_plan(r).format()


# ---------------------------------------------------------------------------- errors

@pytest.mark.parametrize("op, message", [
    ({"transplant_neurons": {"donor": "neu", "neurons": {}}},
     "say which neurons: 'top' (a count or fraction) or 'file'"),
    ({"transplant_neurons": {"donor": "neu", "neurons": {"top": 3, "file": "x.json"}}},
     "give either 'file' or a ranking"),
    ({"transplant_neurons": {"donor": "neu", "neurons": {"file": "/nonexistent/x.json"}}},
     "neuron-set file not found: /nonexistent/x.json"),
    ({"transplant_neurons": {"donor": "neu", "neurons": {"top": 1.5}}},
     "top must be a count >= 1 or a fraction between 0 and 1, got 1.5"),
    ({"transplant_neurons": {"donor": "lang", "neurons": {"top": 3}}}, "the donor 'lang' is the recipient"),
    ({"transplant_neurons": {"donor": "neu", "neurons": {"top": 3, "expert": "nope"}}}, "unknown input 'nope'"),
    ({"reset_neurons": {"to": "zero", "neurons": {"top": 3}}},
     "say whose change ranks the neurons: 'expert' and 'base'"),
    ({"reset_neurons": {"to": "base", "neurons": {"top": 3, "expert": "base"}}}, "expert and base are both 'base'"),
    ({"transplant_neurons": {"donor": "neu", "neurons": {"base": "base", "top": 3, "layers": "0-3"}}},
     "the neuron set is empty"),
    ({"transplant_neurons": {"donor": "neu", "neurons": {"indices": [1], "top": 3}}},
     "give either 'indices', 'file' or a ranking"),
    ({"transplant_neurons": {"donor": "neu", "neurons": {"indices": [1, -2]}}},
     "Input should be greater than or equal to 0"),
    ({"transplant_neurons": {"donor": "neu", "neurons": {"indices": {9: [1]}}}},
     "neuron set names layer 9, but the model has 8 layers"),
    ({"transplant_neurons": {"donor": "neu", "neurons": {"indices": [64]}}}, "neuron 64 is out of range in layer 0"),
    ({"transplant_neurons": {"donor": "neu", "neurons": {"indices": {3: []}}}},
     "the neuron set is empty (explicit indices)"),
    ({"ranked_layer_swap": {"donor": "neu", "k": 9}}, "k = 9 exceeds the model's 8 layers"),
    ({"ranked_layer_swap": {"donor": "neu", "k": 0}}, "Input should be greater than or equal to 1"),
    ({"ranked_layer_swap": {"donor": "neu", "reference": "neu", "k": 2}}, "the donor 'neu' is also the reference"),
    ({"ranked_layer_swap": {"donor": "neu", "k": 2, "split": "middle"}}, "Input should be 'any' or 'outer'"),
])
def test_operation_errors(ckpts, op, message):
    with pytest.raises(RecipeError) as e:
        build_plan(recipe(ckpts, "lang", [op]))
    assert message in str(e.value)
    assert "operations.0" in str(e.value)


def test_stack_with_ranked_swap_is_refused(ckpts):
    with pytest.raises(RecipeError, match="cannot follow a 'stack'"):
        build_plan(recipe(ckpts, "lang", [{"ranked_layer_swap": {"donor": "neu", "k": 2}}],
                          stack=[{"layers": "0-7"}, {"layers": "7"}]))


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", 'expected {"format": "surgery.neurons/1", "neurons"'),
    ("{not json", "not valid JSON"),
    ('{"format": "other/2", "neurons": {}}', "unsupported format 'other/2'"),
    ('{"neurons": {"four": [1]}}', "layer key 'four' is not an integer"),
    ('{"neurons": {"4": [1, -2]}}', "neurons['4']: expected a list of neuron indices (integers >= 0)"),
    ('{"neurons": {"4": [1, 2]}, "scores": {"4": [0.5]}}', "scores['4'] must be a list as long as neurons['4']"),
    ('{"neurons": {"9": [1]}}', "neuron set names layer 9, but the model has 8 layers"),
    ('{"neurons": {"4": [64]}}',
     "neuron 64 is out of range in layer 4: 'model.layers.4.mlp.down_proj.weight' has 64 neurons"),
    ('{"neurons": {"4": []}}', "the neuron set is empty"),
])
def test_bad_neuron_files(ckpts, tmp_path, content, message):
    (tmp_path / "n.json").write_text(content)
    op = {"reset_neurons": {"to": "zero", "neurons": {"file": str(tmp_path / "n.json")}}}
    with pytest.raises(SurgeryError) as e:
        build_plan(recipe(ckpts, "lang", [op]))
    assert message in str(e.value)


# ---------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def cli():
    from surgery.cli import cli
    return cli


def test_cli_diff_outputs(ckpts, tmp_path, cli):
    args = ["diff", str(ckpts["base"]), f"lang={ckpts['lang']}", f"neu={ckpts['neu']}", "-k", "3", "-q"]
    res = CliRunner().invoke(cli, args + ["--csv", str(tmp_path / "s.csv"), "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    assert "expert lang" in res.output and "task vectors lang vs neu" in res.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "p_layers.png").exists()
    assert (tmp_path / "s.csv").read_text().startswith("expert,level,layer,group,kind,name,")
    res = CliRunner().invoke(cli, args + ["--json", "--no-heads"])
    d = json.loads(res.output)
    assert d["schema"] == "surgery.diff/1" and d["heads"] == {"note": "not requested"}
    top = sorted((r["layer"], r["index"]) for r in d["neurons"]["top"] if r["expert"] == "neu")
    assert top == [(4, j) for j in NEURONS]


def test_cli_diff_help_and_errors(ckpts, cli):
    res = CliRunner().invoke(cli, ["diff", "--help"])
    assert res.exit_code == 0 and "Examples:" in res.output and "name=path" in res.output
    base = str(ckpts["base"])
    for args, message in [
        ([base, str(ckpts["lang"]), "-k", "1.5"], "expected a count >= 1 or a fraction between 0 and 1, got '1.5'"),
        ([base, str(ckpts["lang"]), "-k", "many"], "expected a count like 50 or a fraction like 0.01, got 'many'"),
        ([base, f"a={ckpts['lang']}", f"a={ckpts['neu']}"], "two experts are named 'a'; name them with NAME=PATH"),
        ([base, f"a={ckpts['lang']}", f"b={ckpts['neu']}", "--save-neurons", "x.json"],
         "--save-neurons needs exactly one expert"),
        ([base, "/nonexistent/ckpt"], "checkpoint not found: '/nonexistent/ckpt'"),
    ]:
        res = CliRunner().invoke(cli, ["diff"] + args)
        assert res.exit_code != 0 and message in res.output, (args, res.output)
