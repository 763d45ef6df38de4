"""surgery_transplant as a mergekit merge method: exactly the neuron rows and columns move, the same bytes as
`surgery run`'s transplant_neurons and reset_neurons, and one-line errors for bad parameters."""

import subprocess
import sys

import pytest
import torch
from helpers import load, raw_bytes
from mergekit_plugin_kit import assert_same_tensors, layer_of, mergekit_run, surgery_run
from mergekit_plugin_kit import _restore_mergekit_registry  # noqa: F401 (an autouse fixture)

from surgery.errors import SurgeryError


# ---------------------------------------------------------------------------- neuron transplant

def neuron_slices(name, neurons):
    """The entries of neuron set `neurons` in a llama MLP tensor: rows of gate/up, columns of down."""
    if ".mlp.down_proj." in name:
        return (slice(None), neurons)
    if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
        return (neurons, slice(None))
    return None


def test_transplant_moves_exactly_the_neuron_rows_and_columns(models, tmp_path):
    """By hand (the parity tests below compare with the recipe's transplant_neurons)."""
    neurons = {4: [3, 17, 40], 6: [0, 1, 2, 47]}
    out = load(mergekit_run({"merge_method": "surgery_transplant", "base_model": str(models["task"]),
                             "models": [{"model": str(models["lang"])}],
                             "parameters": {"neurons": "4: 3, 17, 40; 6: 0-2, 47"}}, tmp_path / "mk"))
    donor, recipient = load(models["lang"]), load(models["task"])
    assert sorted(out) == sorted(recipient)
    moved = 0
    for name, t in out.items():
        sl = neuron_slices(name, neurons.get(layer_of(name), []))
        want = recipient[name].clone()
        if sl is not None and neurons.get(layer_of(name)):
            want[sl] = donor[name][sl]
            moved += 1
            assert not torch.equal(want, recipient[name])
        assert raw_bytes(t) == raw_bytes(want), name
    assert moved == 6  # gate, up, down in layers 4 and 6


def test_transplant_zero_and_reset(models, tmp_path):
    zero = load(mergekit_run({"merge_method": "surgery_transplant", "base_model": str(models["lang"]),
                              "models": [{"model": str(models["lang"])}],  # mergekit wants a models list
                              "parameters": {"neurons": "5, 9", "layers": "0-1", "mode": "zero"}}, tmp_path / "z"))
    reset = load(mergekit_run({"merge_method": "surgery_transplant", "base_model": str(models["lang"]),
                               "models": [{"model": str(models["base"])}],
                               "parameters": {"neurons": "5, 9"}}, tmp_path / "r"))  # every layer
    lang, base = load(models["lang"]), load(models["base"])
    for name in lang:
        sl = neuron_slices(name, [5, 9])
        want_zero, want_reset = lang[name].clone(), lang[name].clone()
        if sl is not None:
            want_reset[sl] = base[name][sl]
            if layer_of(name) in (0, 1):
                want_zero[sl] = 0
        assert raw_bytes(zero[name]) == raw_bytes(want_zero), name
        assert raw_bytes(reset[name]) == raw_bytes(want_reset), name


@pytest.mark.slow
def test_transplant_matches_surgery_run_of_transplant_neurons(models, tmp_path):
    """`surgery mergekit` (a real process) == surgery.run of transplant_neurons with the same indices."""
    cfg = tmp_path / "t.yml"
    cfg.write_text(f"merge_method: surgery_transplant\nbase_model: {models['task']}\nmodels:\n"
                   f"  - model: {models['lang']}\nparameters:\n  neurons: '4: 3, 17, 40; 6-7: 0-2, 47'\n"
                   "dtype: bfloat16\n")
    r = subprocess.run([sys.executable, "-m", "surgery", "mergekit", str(cfg), str(tmp_path / "mk"),
                        "--no-copy-tokenizer", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    neurons = {"indices": {4: [3, 17, 40], 6: [0, 1, 2, 47], 7: [0, 1, 2, 47]}}
    sg = surgery_run({"task": models["task"], "lang": models["lang"]},
                     [{"transplant_neurons": {"donor": "lang", "neurons": neurons}}], tmp_path / "sg")
    out = assert_same_tensors(tmp_path / "mk", sg)
    recipient = load(models["task"])
    assert sum(raw_bytes(t) != raw_bytes(recipient[n]) for n, t in out.items()) == 9  # gate/up/down x 3 layers


def test_transplant_zero_matches_surgery_run_of_reset_neurons(models, tmp_path):
    mk = mergekit_run({"merge_method": "surgery_transplant", "base_model": str(models["lang"]),
                       "models": [{"model": str(models["lang"])}],
                       "parameters": {"neurons": "5, 9-10", "layers": "0-1, 7", "mode": "zero"}}, tmp_path / "mk")
    sg = surgery_run({"lang": models["lang"]},
                     [{"reset_neurons": {"to": "zero", "neurons": {"indices": [5, 9, 10], "layers": "0-1, 7"}}}],
                     tmp_path / "sg")
    assert_same_tensors(mk, sg)


TRANSPLANT_ERRORS = [
    ({"neurons": "3, 48"}, "parameter 'neurons': neuron 48 is out of range in layer 0: "
                           "'model.layers.0.mlp.down_proj.weight' "
                           "has 48 neurons (0-47)"),
    ({"neurons": "3; x"}, "parameter 'neurons': expected neuron indices like '3, 17, 40-45'"),
    ({"neurons": "9: 3"}, "parameter 'neurons': layer 9 is out of range: the model has 8 layers (0-7)"),
    ({"neurons": "4: 3", "layers": "4"}, "give either per-layer 'neurons' ('4: 3,17') or 'layers', not both"),
    ({"neurons": "3", "mode": "zero"}, "mode 'zero' takes no donor"),
    ({"neurons": "3", "mode": "swap"}, "parameter 'mode': Input should be 'transplant' or 'zero' (got 'swap')"),
    ({}, "Missing required parameter neurons"),
]


@pytest.mark.parametrize("params, message", TRANSPLANT_ERRORS,
                         ids=[",".join(p) or "empty" for p, _ in TRANSPLANT_ERRORS])
def test_transplant_bad_parameters(models, tmp_path, params, message):
    with pytest.raises(SurgeryError) as e:
        mergekit_run({"merge_method": "surgery_transplant", "base_model": str(models["task"]),
                      "models": [{"model": str(models["lang"])}], "parameters": params}, tmp_path / "out")
    assert message in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_transplant_needs_a_donor(models, tmp_path):
    with pytest.raises(SurgeryError, match="mode 'transplant' needs a donor: one model besides base_model"):
        mergekit_run({"merge_method": "surgery_transplant", "base_model": str(models["task"]),
                      "models": [{"model": str(models["task"])}], "parameters": {"neurons": "3"}}, tmp_path / "out")
