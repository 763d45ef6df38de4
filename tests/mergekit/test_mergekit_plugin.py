"""surgery operations registered as mergekit merge methods (surgery/mergekit/methods.py).

For each method, mergekit's own pipeline (run_merge, in-process, or `surgery mergekit` in a
subprocess) and `surgery run` with the equivalent recipe must write the same tensor names,
dtypes and bytes. Bitwise, not 1 ulp: both sides run surgery's planner and ops.evaluate on the
same bf16 inputs (fp32 math, one round-to-nearest cast to bf16), so any difference is a bug.
surgery_transplant: test_mergekit_transplant.py.
"""

import json
import subprocess
import sys

import pytest
import torch
from helpers import load, raw_bytes
from mergekit_plugin_kit import N_LAYERS, assert_same_tensors, layer_of, mergekit_run, surgery_run
from mergekit_plugin_kit import _restore_mergekit_registry  # noqa: F401 (an autouse fixture)

from surgery.errors import SurgeryError


# ---------------------------------------------------------------------------- registration

@pytest.mark.slow
def test_register_all_is_idempotent_and_lazy():
    code = ("import sys, surgery.mergekit.methods as p; assert 'mergekit' not in sys.modules; "
            "print(p.register_all() == p.register_all())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"

    from mergekit import merge_methods

    from surgery.mergekit.methods import METHOD_NAMES, register_all

    register_all()
    names = {m.spec.name for m in merge_methods.registered_methods()}
    assert set(METHOD_NAMES) <= names
    assert merge_methods.get("surgery_layer_swap").spec.contract.base.value == "required"


def test_register_all_refuses_a_foreign_method_with_our_name(monkeypatch):
    from mergekit.merge_methods import linear, registry

    from surgery.mergekit.methods import register_all

    register_all()
    monkeypatch.setitem(registry._METHODS, "surgery_blend", linear.linear_merge)
    with pytest.raises(SurgeryError, match="different merge method named 'surgery_blend'"):
        register_all()


# ---------------------------------------------------------------------------- layer swap

def test_layer_swap_with_transition_zones_matches_surgery_run(models, tmp_path):
    params = {"bottom": 2, "top": 1, "transition": 2, "embeddings": "donor", "lm_head": 0.5}
    mk = mergekit_run({"merge_method": "surgery_layer_swap", "base_model": str(models["task"]),
                       "models": [{"model": str(models["lang"])}], "parameters": params}, tmp_path / "mk")
    sg = surgery_run({"task": models["task"], "lang": models["lang"]},
                     [{"layer_swap": {"donor": "lang", **params}}], tmp_path / "sg")
    out = assert_same_tensors(mk, sg)

    donor, recipient = load(models["lang"]), load(models["task"])
    # swapped {0, 1, 7}; transition width 2: layers 2, 6 at distance 1, layers 3, 5 at distance 2
    donor_weight = {0: 1.0, 1: 1.0, 7: 1.0, 2: 2 / 3, 6: 2 / 3, 3: 1 / 3, 5: 1 / 3, 4: 0.0}
    seen = set()
    for name, t in out.items():
        layer = layer_of(name)
        w = donor_weight.get(layer) if layer is not None else \
            {"model.embed_tokens.weight": 1.0, "lm_head.weight": 0.5, "model.norm.weight": 0.0}[name]
        if w == 1.0:
            assert raw_bytes(t) == raw_bytes(donor[name]), name
        elif w == 0.0:
            assert raw_bytes(t) == raw_bytes(recipient[name]), name
        else:
            want = w * donor[name].float() + (1 - w) * recipient[name].float()
            # independent formula, different fp32 rounding order: within 1 bf16 ulp
            torch.testing.assert_close(t.float(), want.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6)
            assert not torch.equal(t, recipient[name]) and not torch.equal(t, donor[name]), name
        seen.add(w)
    assert seen == {0.0, 1 / 3, 0.5, 2 / 3, 1.0}


def test_layer_swap_explicit_layers_and_config_json(models, tmp_path):
    params = {"layers": "3-4", "final_norm": "donor"}
    mk = mergekit_run({"merge_method": "surgery_layer_swap", "base_model": str(models["task"]),
                       "models": [{"model": str(models["en"])}], "parameters": params}, tmp_path / "mk")
    sg = surgery_run({"task": models["task"], "en": models["en"]}, [{"layer_swap": {"donor": "en", **params}}],
                     tmp_path / "sg")
    out = assert_same_tensors(mk, sg)
    donor, recipient = load(models["en"]), load(models["task"])
    for name, t in out.items():
        src = donor if layer_of(name) in (3, 4) or name == "model.norm.weight" else recipient
        assert raw_bytes(t) == raw_bytes(src[name]), name
    cfg = json.loads((mk / "config.json").read_text())
    assert cfg["num_hidden_layers"] == N_LAYERS and (mk / "mergekit_config.yml").is_file()


# ---------------------------------------------------------------------------- arithmetic and blend

def test_arithmetic_adamergex_matches_surgery_run(models, tmp_path):
    """task + 0.7*(lang - en): references other than a base, a negative weight, no base_model."""
    mk = mergekit_run({"merge_method": "surgery_arithmetic", "models": [
        {"model": str(models["task"]), "parameters": {"weight": 1.0}},
        {"model": str(models["lang"]), "parameters": {"weight": 0.7}},
        {"model": str(models["en"]), "parameters": {"weight": -0.7}}]}, tmp_path / "mk")
    sg = surgery_run({"task": models["task"], "lang": models["lang"], "en": models["en"]},
                     [{"arithmetic": {"expr": "task + 0.7*(lang - en)"}}], tmp_path / "sg")
    out = assert_same_tensors(mk, sg)
    task, lang, en = load(models["task"]), load(models["lang"]), load(models["en"])
    name = "model.layers.5.mlp.down_proj.weight"
    want = task[name].float() + 0.7 * (lang[name].float() - en[name].float())
    torch.testing.assert_close(out[name].float(), want.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6)


def test_arithmetic_with_filtered_weights_takes_bytes(models, tmp_path):
    """Weights 1/0 set per tensor with a mergekit filter: a byte-exact take of the MLP from 'lang'."""
    mk = mergekit_run({"merge_method": "surgery_arithmetic", "models": [
        {"model": str(models["task"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.0}, {"value": 1.0}]}},
        {"model": str(models["lang"]), "parameters": {"weight": [{"filter": "mlp", "value": 1.0}, {"value": 0.0}]}}]},
        tmp_path / "mk")
    sg = surgery_run({"task": models["task"], "lang": models["lang"]},
                     [{"take": {"from": "lang", "select": {"modules": ["mlp"]}}}], tmp_path / "sg")
    assert_same_tensors(mk, sg)


def test_blend_with_base_and_gradient_matches_surgery(models, tmp_path):
    """surgery_blend normalizes like recipe `blend`; a base_model is just another weighted input."""
    mk = mergekit_run({"merge_method": "surgery_blend", "base_model": str(models["base"]), "models": [
        {"model": str(models["task"]), "parameters": {"weight": 2.0}},
        {"model": str(models["base"]), "parameters": {"weight": 6.0}}]}, tmp_path / "mk")
    sg = surgery_run({"task": models["task"], "base": models["base"]},
                     [{"blend": {"weights": {"task": 2.0, "base": 6.0}}}], tmp_path / "sg")
    assert_same_tensors(mk, sg)


def test_python_api_run_merge_as_documented(models, tmp_path):
    """docs/mergekit_plugin.md: register_all() then mergekit's run_merge, no surgery CLI involved."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from surgery.mergekit.methods import register_all

    register_all()
    text = f"""
merge_method: surgery_layer_swap
base_model: {models['task']}
models:
  - model: {models['lang']}
parameters: {{bottom: 1, top: 1, transition: 1}}
"""
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mk"),
              options=MergeOptions(copy_tokenizer=False, quiet=True))
    sg = surgery_run({"task": models["task"], "lang": models["lang"]},
                     [{"layer_swap": {"donor": "lang", "bottom": 1, "top": 1, "transition": 1}}], tmp_path / "sg")
    assert_same_tensors(tmp_path / "mk", sg)


# ---------------------------------------------------------------------------- errors

SWAP_ERRORS = [
    ({"bottom": -1}, "surgery_layer_swap: parameter 'bottom': Input should be greater than or equal to 0 (got -1)"),
    ({"layers": [0, 7]}, "parameter 'layers': Input should be a valid string (got 0). Give layers as a string like "
                         "'0-3, 28-31'; a YAML list is a mergekit gradient"),
    ({"bottom": 5, "top": 5},
     "parameter 'top': layer out of range: bottom 5 + top 5 layers exceed the model's 8 layers"),
    ({"layers": "0-99"}, "parameter 'layers': layer 8 is out of range: the model has 8 layers (0-7)"),
    ({"bottom": 1, "lm_head": 1.5}, "parameter 'lm_head': donor weight must be between 0 and 1, got 1.5"),
    ({"bottom": 1, "embeddings": "dnor"}, "parameter 'embeddings': Input should be 'recipient' or 'donor' (got "
                                          "'dnor'): "
                                          "'recipient', 'donor', or the donor's weight in a blend (0 to 1)"),
    ({}, "surgery_layer_swap: parameters: nothing to swap: set 'bottom', 'top' or 'layers'"),
    ({"botom": 2}, "parameters.botom: surgery_layer_swap has no parameter 'botom'; did you mean 'bottom'?"),
    ({"top": 2, "num_layers": 4}, "tensor 'model.layers.4.input_layernorm.weight' is in layer 4 but the model has 4 "
                                  "layers; set parameter 'num_layers'"),
]


@pytest.mark.parametrize("params, message", SWAP_ERRORS, ids=[",".join(p) or "empty" for p, _ in SWAP_ERRORS])
def test_layer_swap_bad_parameters(models, tmp_path, params, message):
    with pytest.raises(SurgeryError) as e:
        mergekit_run({"merge_method": "surgery_layer_swap", "base_model": str(models["task"]),
                      "models": [{"model": str(models["lang"])}], "parameters": params}, tmp_path / "out")
    assert message in str(e.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []  # nothing written, no temp left


def test_structural_errors(models, tmp_path):
    task, lang, en = (str(models[k]) for k in ("task", "lang", "en"))
    cases = [
        ({"merge_method": "surgery_layer_swap", "base_model": task, "models": [{"model": task}],
          "parameters": {"bottom": 1}}, "Merge method requires at least 1 non-base inputs"),
        ({"merge_method": "surgery_layer_swap", "base_model": task, "models": [{"model": lang}, {"model": en}],
          "parameters": {"bottom": 1}}, "requires exactly 1 non-base inputs"),
        ({"merge_method": "surgery_arithmetic",
          "models": [{"model": task}, {"model": lang, "parameters": {"weight": 1}}]},
         "Missing required parameter weight"),
        ({"merge_method": "surgery_arithmetic", "models": [{"model": task, "parameters": {"weight": 0}}]},
         "surgery_arithmetic: every weight is 0"),
        ({"merge_method": "surgery_arithmetic", "models": [{"model": task, "parameters": {"weight": "x"}}]},
         "surgery_arithmetic: parameter 'weight': Input should be a valid number"),
        ({"merge_method": "surgery_blend", "models": [{"model": task, "parameters": {"weight": 1.0}},
                                                      {"model": lang, "parameters": {"weight": -1.0}}]},
         "surgery_blend: parameter 'weight': weights sum to 0; cannot normalize (set normalize: false)"),
        ({"merge_method": "surgery_layerswap", "models": [{"model": task}]},
         "unknown merge method 'surgery_layerswap'; did you mean 'surgery_layer_swap'?"),
    ]
    with pytest.raises(SurgeryError, match="unknown mergekit option 'random_sed'"):
        mergekit_run(cases[0][0], tmp_path / "out", random_sed=1)
    for config, message in cases:
        with pytest.raises(SurgeryError) as e:
            mergekit_run(config, tmp_path / "out")
        assert message in str(e.value), (config, str(e.value))
        assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(models, tmp_path):
    (tmp_path / "out").mkdir()
    config = {"merge_method": "surgery_arithmetic", "models": [{"model": str(models["task"]),
                                                                "parameters": {"weight": 1.0}}]}
    with pytest.raises(SurgeryError, match="already exists; pass --force"):
        mergekit_run(config, tmp_path / "out")
    from surgery.mergekit.runner import run_mergekit

    run_mergekit(config, tmp_path / "out", force=True, options={"copy_tokenizer": False, "quiet": True})
    assert_same_tensors(tmp_path / "out", models["task"])


# ---------------------------------------------------------------------------- CLI

@pytest.mark.slow
def test_cli_runs_mergekit_pipeline_with_passthrough_options(models, tmp_path):
    """One real process: `surgery mergekit CONFIG OUT` plus mergekit-yaml options."""
    cfg = tmp_path / "swap.yml"
    cfg.write_text(f"merge_method: surgery_layer_swap\nbase_model: {models['task']}\nmodels:\n"
                   f"  - model: {models['lang']}\nparameters:\n  bottom: 2\n  top: 2\n  transition: 1\n"
                   "dtype: bfloat16\nout_dtype: float32\n")
    r = subprocess.run([sys.executable, "-m", "surgery", "mergekit", str(cfg), str(tmp_path / "mk"),
                        "--random-seed", "1", "--no-copy-tokenizer", "--out-shard-size", "20K", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "mk").glob("*.safetensors"))) > 1  # --out-shard-size reached mergekit
    mk = load(tmp_path / "mk")
    sg = load(surgery_run({"task": models["task"], "lang": models["lang"]},
                          [{"layer_swap": {"donor": "lang", "bottom": 2, "top": 2, "transition": 1}}], tmp_path / "sg"))
    assert sorted(mk) == sorted(sg)
    for name in mk:  # out_dtype float32: mergekit's exact upcast of the bf16 result
        assert mk[name].dtype == torch.float32 and torch.equal(mk[name], sg[name].float()), name


def test_cli_usage_and_errors(models, tmp_path):
    from click.testing import CliRunner

    import surgery.cli.mergekit  # noqa: F401  registers the command
    from surgery.cli import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["mergekit", "--help"])
    assert r.exit_code == 0 and "merge_method: surgery_layer_swap" in r.output and "--mergekit-help" in r.output
    r = runner.invoke(cli, ["mergekit", "--mergekit-help"])
    assert r.exit_code == 0 and "--random-seed" in r.output and "--allow-crimes" in r.output
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: surgery_arithmetic\nmodels:\n  - model: {models['task']}\n"
                   "    parameters: {weight: 1.0}\n")
    r = runner.invoke(cli, ["mergekit", str(cfg), str(tmp_path / "o"), "--no-such-option"])
    assert r.exit_code == 2 and "No such option '--no-such-option'" in r.output
    r = runner.invoke(cli, ["mergekit", str(tmp_path / "missing.yml"), str(tmp_path / "o")])
    assert r.exit_code == 1 and "error: mergekit config not found" in r.output
    cfg.write_text(f"merge_method: surgery_layer_swap\nbase_model: {models['task']}\nmodels:\n"
                   f"  - model: {models['lang']}\nparameters:\n  bottom: -2\n")
    r = runner.invoke(cli, ["mergekit", str(cfg), str(tmp_path / "o"), "--no-copy-tokenizer", "--quiet"])
    assert r.exit_code == 1 and r.output == (f"error: {cfg}: surgery_layer_swap: parameter 'bottom': Input should be "
                                             "greater than or equal to 0 (got -2)\n")
    cfg.write_text("merge_method: linear\nmodels: 3\n")
    r = runner.invoke(cli, ["mergekit", str(cfg), str(tmp_path / "o")])
    assert r.exit_code == 1 and f"error: {cfg}: models: Input should be a valid list" in r.output
    assert not (tmp_path / "o").exists()


def test_in_memory_api_outside_the_pipeline():
    """mergekit's callable API: plain ids, the tensor name in the group's metadata."""
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    from surgery.mergekit.methods import register_all

    register_all()
    a = torch.randn(4, 6, dtype=torch.bfloat16)
    b = torch.randn(4, 6, dtype=torch.bfloat16)
    name = "model.layers.2.mlp.up_proj.weight"
    group = TensorGroup.from_tensors([a, b], ids=["r", "d"], base_index=0, name=name)
    (out,) = merge_methods.get("surgery_arithmetic")((group,), parameters={"weight": {"r": 1.0, "d": -0.5}})
    want = (a.float() * 1.0 + b.float() * -0.5).to(torch.bfloat16)  # surgery's linear op
    assert raw_bytes(out) == raw_bytes(want)
    swap = merge_methods.get("surgery_layer_swap")
    (out,) = swap((group,), parameters={"bottom": 1, "transition": 1, "num_layers": 4})
    want = (b.float() * 0.5 + a.float() * 0.5).to(torch.bfloat16)  # layer 2: distance 2 > 1 -> recipient
    assert raw_bytes(out) == raw_bytes(a)
    (out,) = swap((group,), parameters={"layers": "1", "transition": 1, "num_layers": 4})
    assert raw_bytes(out) == raw_bytes(want)
    with pytest.raises(SurgeryError, match="cannot tell the number of layers; set parameter 'num_layers'"):
        swap((group,), parameters={"bottom": 1})
    nameless = TensorGroup.from_tensors([a, b], ids=["r", "d"], base_index=0)
    with pytest.raises(SurgeryError, match="needs the tensor name"):
        swap((nameless,), parameters={"bottom": 1, "num_layers": 4})



def test_builtin_random_method_is_reproducible_with_seed(models, tmp_path):
    """`surgery mergekit` runs any mergekit config; --random-seed reaches mergekit's dare_ties."""
    config = {"merge_method": "dare_ties", "base_model": str(models["base"]), "models": [
        {"model": str(models["task"]), "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": str(models["lang"]), "parameters": {"weight": 0.5, "density": 0.5}}]}
    runs = [load(mergekit_run(config, tmp_path / f"s{i}", random_seed=seed)) for i, seed in enumerate((1, 1, 2))]
    name = "model.layers.3.mlp.up_proj.weight"
    assert raw_bytes(runs[0][name]) == raw_bytes(runs[1][name])
    assert raw_bytes(runs[0][name]) != raw_bytes(runs[2][name])
