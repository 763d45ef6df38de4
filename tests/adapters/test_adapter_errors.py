"""Bad adapters: one-line errors naming the adapter file and what is wrong, in the API, recipes and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from adapter_kit import _adamergex_inputs, _copy, _ops, make_adapter

from helpers import random_state, run_cli, save_checkpoint, tiny_config

from surgery.errors import SurgeryError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


# ---------------------------------------------------------------------------- bad adapters

def _plan_error(ad, adapter, base="base", match=None):
    from surgery.pipeline import build_plan
    from surgery.loader import load_recipe

    with pytest.raises(SurgeryError, match=match) as e:
        build_plan(load_recipe({"inputs": {"base": str(ad[base] if base in ad else base),
                                           "sw": {"adapter": str(adapter), "base": "base"}}}))
    return str(e.value)


def test_error_missing_base_module(ad, tmp_path):
    bad = _copy(ad["lora_task"], tmp_path / "bad", tensors=lambda t: {
        k.replace("layers.7.", "layers.9."): v for k, v in t.items()})
    msg = _plan_error(ad, bad, match="missing base module")
    assert "inputs.sw" in msg and "targets 'model.layers.9." in msg


def test_error_rank_mismatch(ad, tmp_path):
    bad = _copy(ad["lora_task"], tmp_path / "bad", config={"r": 8})
    msg = _plan_error(ad, bad, match="rank mismatch")
    assert "says r=8 but lora_A has shape [4, 48] and lora_B [32, 4]" in msg


def test_error_shape_mismatch(ad, tmp_path):
    cfg = tiny_config("llama", intermediate_size=64)
    other = save_checkpoint(tmp_path / "wide", random_state(cfg, 0), cfg)
    msg = _plan_error(ad, ad["lora_task"], base=str(other), match="shape mismatch")
    assert "B·A is [32, 48]" in msg and "[32, 64]" in msg
    msg = _plan_error(ad, ad["ia3_task"], base=str(other), match="shape mismatch")
    assert "does not scale a row or column" in msg


def test_error_unsupported_peft_types(ad, tmp_path):
    from peft import LoHaConfig, LoraConfig

    loha = make_adapter(ad["base"], tmp_path / "loha", LoHaConfig(r=2, target_modules=["q_proj"]), 0)
    assert "unsupported PEFT type 'LOHA' (supported: LORA, IA3)" in _plan_error(ad, loha)
    dora = make_adapter(ad["base"], tmp_path / "dora", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), 0)
    assert "DoRA adapters (use_dora=True) are not supported" in _plan_error(ad, dora)
    assert "no adapter_config.json; not a PEFT adapter directory" in _plan_error(ad, ad["base"])
    assert "adapter not found" in _plan_error(ad, tmp_path / "nope")


def test_recipe_errors_for_adapters(ad, tmp_path):
    from surgery.pipeline import build_plan
    from surgery.loader import load_recipe

    y = tmp_path / "r.yaml"
    y.write_text(f"inputs:\n  base: {ad['base']}\n  a: {{adapter: {ad['lora_task']}, base: base}}\n"
                 f"  b: {{adapter: {ad['lora_tgt']}, base: a}}\n")
    with pytest.raises(SurgeryError, match=r"r.yaml:4: inputs.b.base: the base of adapter 'b' must be a checkpoint"):
        load_recipe(y)
    with pytest.raises(SurgeryError, match=r"inputs.a: base 'bse' is not an input name, and as a path: checkpoint "
                                           r"not found: .*; did you mean input 'base'\?"):
        build_plan(load_recipe({"inputs": {"base": str(ad["base"]), "a": {"adapter": str(ad["lora_task"]),
                                                                          "base": "bse"}}}))
    inputs = {"base": str(ad["base"]), "i": {"adapter": str(ad["ia3_task"]), "base": "base"}}
    with pytest.raises(SurgeryError, match="input 'base' is a checkpoint, not an adapter"):
        build_plan(load_recipe({"inputs": inputs, "operations": [{"apply_adapters": {"adapters": ["base"]}}]}))
    with pytest.raises(SurgeryError, match=r"an \(IA\)³ adapter cannot be weighted"):
        build_plan(load_recipe({"inputs": inputs,
                                "operations": [{"apply_adapters": {"adapters": ["i"], "weights": [2]}}]}))
    mixed = {**_adamergex_inputs(ad, "lora"), "tgt": {"adapter": str(ad["ia3_tgt"]), "base": "base"}}
    with pytest.raises(SurgeryError, match="AdaMergeX needs adapters of one type"):
        build_plan(load_recipe({"inputs": mixed, "operations": _ops(1.0)}))
    ranks = {**_adamergex_inputs(ad, "lora"), "tgt": {"adapter": str(ad["lora_lang2"]), "base": "base"}}
    with pytest.raises(SurgeryError, match="do not adapt it like the others"):
        build_plan(load_recipe({"inputs": ranks, "operations": _ops(1.0, "factors")}))


def test_cli_reports_bad_adapter_in_one_line(ad, tmp_path):
    bad = _copy(ad["lora_task"], tmp_path / "bad", config={"r": 2})
    y = tmp_path / "r.yaml"
    y.write_text(f"inputs:\n  base: {ad['base']}\n  sw: {{adapter: {bad}, base: base}}\nrecipient: sw\n")
    p = run_cli("validate", y, cwd=Path(__file__).parents[2])
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert p.stderr.startswith(f"error: {y}:3: inputs.sw: ") and "rank mismatch" in p.stderr


def test_adapter_input_schema_errors(tmp_path):
    from surgery.errors import RecipeError
    from surgery.loader import load_recipe

    y = tmp_path / "r.yaml"
    y.write_text("inputs:\n  base: models/base\n  sw: {adapter: a/sw, bse: base}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(y)
    assert str(e.value) == f"{y}:3: inputs.sw.bse: unknown key 'bse'; did you mean 'base'? (valid keys: adapter, base)"
    y.write_text("inputs:\n  base: models/base\n  sw: {adapter: a/sw}\n")
    with pytest.raises(RecipeError, match=r"r.yaml:3: inputs.sw.base: missing required key 'base'"):
        load_recipe(y)
