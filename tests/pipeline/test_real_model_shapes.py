"""Issue 16: what SmolLM2-135M (tied embeddings, GQA) and its fine-tunes showed, on tiny models of those shapes.

Every checkpoint here has tied embeddings (no lm_head tensor, as save_pretrained writes them) and
grouped-query attention (2 key/value heads for 4 query heads); 'deep' has more layers than the others.
"""

from __future__ import annotations


import pytest
import torch
from click.testing import CliRunner

from helpers import load, perturb, raw_bytes, save_checkpoint, tied_config as tied, tied_state as saved_state

import surgery
from surgery.cli import cli
from surgery.errors import SurgeryError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    out = {}
    for arch in ("llama", "qwen2"):
        cfg = tied(arch)
        base = saved_state(cfg)
        out[f"{arch}_base"] = save_checkpoint(root / f"{arch}_base", base, cfg, dtype=torch.bfloat16)
        out[f"{arch}_de"] = save_checkpoint(root / f"{arch}_de", perturb(base, None, 0.02, seed=1), cfg,
                                            dtype=torch.bfloat16)
    deep_cfg = tied("llama", num_hidden_layers=10)
    out["deep"] = save_checkpoint(root / "deep", perturb(saved_state(deep_cfg, 3), None, 0.02, seed=4), deep_cfg,
                                  dtype=torch.bfloat16)
    return out


def plan_error(recipe: dict) -> str:
    with pytest.raises(SurgeryError) as info:
        surgery.build_plan(recipe)
    return str(info.value)


# ---------------------------------------------------------------------------- 1: selections that match nothing

TIED = "ties lm_head to the embeddings (tie_word_embeddings), so it has no lm_head tensor"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lm_head_of_a_tied_model_is_an_error_that_says_how_to_select_it(models, arch):
    inputs = {"a": str(models[f"{arch}_base"]), "de": str(models[f"{arch}_de"])}
    msg = plan_error({"inputs": inputs, "operations": [{"take": {"from": "de", "select": {"modules": ["lm_head"]}}}]})
    assert msg == (f"recipe: operations.0.take.select.modules: #1 take selects no tensor: this model {TIED}; "
                   "select the embeddings (modules: [embed]) to change both")
    msg = plan_error({"inputs": inputs, "operations": [{"layer_swap": {"donor": "de", "top": 2, "lm_head": "donor"}}]})
    assert msg == (f"recipe: operations.0.layer_swap.lm_head: lm_head: donor changes nothing: this model {TIED}; "
                   "use embeddings: donor to change both")
    msg = plan_error({"inputs": inputs, "operations": [
        {"take": {"from": "de", "select": {"layers": 0}}},
        {"ranked_layer_swap": {"donor": "de", "k": 2, "lm_head": 0.5}}]})
    assert msg.startswith("recipe: operations.1.ranked_layer_swap.lm_head: lm_head: 0.5 changes nothing")
    # selecting the embeddings, as the message says, changes both
    plan = surgery.build_plan({"inputs": inputs,
                               "operations": [{"take": {"from": "de", "select": {"modules": ["embed"]}}}]})
    assert [e.name for e in plan.entries if e.rule == "#1 take"] == ["model.embed_tokens.weight"]


@pytest.mark.parametrize("op, where, what", [
    ({"take": {"from": "de", "select": {"names": ["*.mlp.up_proj.weight", "*.mlp.upp_proj.*"]}}},
     "operations.0.take.select.names.1", "#1 take selects no tensor: no tensor name matches '*.mlp.upp_proj.*'"),
    ({"blend": {"weights": {"a": 1, "de": 1}, "select": {"layers": 3, "modules": ["embed"]}}},
     "operations.0.blend.select",
     "#1 blend selects no tensor: no tensor matches all of {layers: 3, modules: ['embed']}"),
    ({"arithmetic": {"expr": "a + 0.5*(de - a)", "select": {"names": ["re:bias$"]}}},
     "operations.0.arithmetic.select.names.0", "#1 arithmetic selects no tensor: no tensor name matches 're:bias$'"),
    ({"merge": {"method": "linear", "models": {"a": {"weight": 1}, "de": {"weight": 1}},
                "select": {"layers": "0-1", "names": ["re:embed"]}}},
     "operations.0.merge.select", "#1 merge selects no tensor: no tensor matches all of"),
    ({"reset_neurons": {"to": "a", "neurons": {"indices": [1]}}},  # the recipient reset to itself is fine...
     None, None),
])
def test_every_operation_that_selects_nothing_is_an_error(models, op, where, what):
    recipe = {"inputs": {"a": str(models["llama_base"]), "de": str(models["llama_de"])}, "operations": [op]}
    if where is None:
        surgery.build_plan(recipe)
        return
    assert plan_error(recipe).startswith(f"recipe: {where}: {what}")


def test_adapters_that_touch_nothing_selected_are_an_error(models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models["llama_base"], dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "lora")
    inputs = {"a": str(models["llama_base"]), "l": {"adapter": str(tmp_path / "lora"), "base": "a"}}
    msg = plan_error({"inputs": inputs, "operations": [{"apply_adapters": {"adapters": ["l"],
                                                                           "select": {"modules": ["mlp"]}}}]})
    assert msg == "recipe: operations.0.apply_adapters: #1 apply_adapters changes no tensor: nothing it selects " \
                  "is affected by it"
    plan = surgery.build_plan({"inputs": inputs, "operations": [{"apply_adapters": {"adapters": ["l"]}}]})
    assert sum(e.rule == "#1 apply_adapters" for e in plan.entries) == 8  # q_proj of every layer


def test_cli_reports_the_empty_selection_with_its_line(models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs:\n  a: {models['llama_base']}\n  de: {models['llama_de']}\noperations:\n"
                      "  - take:\n      from: de\n      select:\n        modules: [lm_head]\n")
    res = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert res.exit_code == 1
    assert res.output == (f"error: {recipe}:8: operations.0.take.select.modules: #1 take selects no tensor: "
                          f"this model {TIED}; select the embeddings (modules: [embed]) to change both\n")


# ---------------------------------------------------------------------------- 2: different depths

@pytest.mark.parametrize("op", [{"layer_swap": {"donor": "deep", "top": 2}},
                                {"arithmetic": {"expr": "0.5*a + 0.5*deep"}},
                                {"merge": {"method": "linear", "models": {"a": {"weight": 1}, "deep": {"weight": 1}}}}])
def test_inputs_of_another_depth_are_refused_naming_both(models, op):
    msg = plan_error({"inputs": {"a": str(models["llama_base"]), "deep": str(models["deep"])}, "operations": [op]})
    assert msg.startswith("recipe: inputs.deep: input 'deep' has 10 layers but the recipient 'a' has 8; "
                          "operations pair layers by index, so map them explicitly with a 'stack'")


def test_a_stack_maps_the_deeper_donor_explicitly(models, tmp_path):
    """top: 2 counts from the top of the output's layers; the stack says which donor layers line up with them."""
    recipe = {"inputs": {"a": str(models["llama_base"]), "deep": str(models["deep"])},
              "stack": [{"layers": "0-7", "sources": {"deep": "2-9"}}],
              "operations": [{"layer_swap": {"donor": "deep", "top": 2}}]}
    surgery.run(recipe, tmp_path / "out")
    out, deep, a = load(tmp_path / "out"), load(models["deep"]), load(models["llama_base"])
    for name in out:
        if ".layers.6." in name or ".layers.7." in name:
            src = name.replace(".layers.6.", ".layers.8.").replace(".layers.7.", ".layers.9.")
            assert raw_bytes(out[name]) == raw_bytes(deep[src]), name  # the donor's top layers, 8 and 9
        else:
            assert raw_bytes(out[name]) == raw_bytes(a[name]), name


# ---------------------------------------------------------------------------- 11: stack labels

def test_plan_labels_stacked_layers_with_their_input(models):
    plan = surgery.build_plan({"inputs": {"a": str(models["llama_base"]), "de": str(models["llama_de"])},
                               "stack": [{"layers": "0-3"}, {"layers": "4-7", "from": "de"}]})
    text = plan.format()
    assert "[stack from de]" in text and text.count("[recipient]") == 3  # layers 0-3, before and after layers
    rows = plan.layer_summary()
    assert ([r["sources"][0]["rule"] for r in rows if r["layer"] is not None]
            == ["recipient"] * 4 + ["stack from de"] * 4)


def test_shard_size_error_names_its_value_once(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("inputs:\n  a: /nowhere\noutput:\n  shard_size: -5MB\n")
    res = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert res.exit_code == 1
    assert res.output.strip().endswith("expected a size like 500MB or 2GB, got '-5MB'")
    assert res.output.count("-5MB") == 1
