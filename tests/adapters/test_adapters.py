"""PEFT adapters as inputs and MAD-X stacking, checked against real peft's merge_and_unload (AdaMergeX:
test_adamergex.py; LoRA extraction: test_extract_lora.py; bad adapters: test_adapter_errors.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from adapter_kit import DOWN3, Q0, _copy, peft_merged, raw, run_recipe

from helpers import load, random_state, save_checkpoint, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


# ---------------------------------------------------------------------------- adapters as inputs

@pytest.mark.parametrize("base,name", [("base", "lora_full"), ("base", "lora_rs"), ("base", "ia3_task"),
                                       ("gbase", "g_lora"), ("gbase", "g_ia3"), ("gbase", "g_bias")])
def test_adapter_input_equals_peft_merge_and_unload(ad, tmp_path, base, name):
    out = run_recipe({"inputs": {"base": str(ad[base]), "sw": {"adapter": str(ad[name]), "base": "base"}},
                      "recipient": "sw"}, tmp_path / "out")
    ref = peft_merged(ad[base], ad[name])
    basew = load(ad[base])
    changed = [k for k in ref if k in out and not torch.equal(ref[k], basew[k])]
    assert len(changed) >= 8  # the adapter really changes tensors
    for k in ref:
        if k in out:
            assert torch.equal(out[k], ref[k]), k  # bitwise


def test_adapter_reads_like_a_checkpoint(ad):
    from surgery.adapters.view import open_adapter
    from surgery.io.checkpoint import Checkpoint

    base = Checkpoint.open(ad["base"])
    view = open_adapter(ad["lora_full"], base, name="sw")
    ref = peft_merged(ad["base"], ad["lora_full"])
    assert view.keys() == base.keys() and view.meta == base.meta
    assert view.config == base.config and view.root == base.root and view.ref == str(ad["lora_full"])
    assert Q0 in view and torch.equal(view.get(Q0), ref[Q0])
    assert torch.equal(view.get("lm_head.weight"), ref["lm_head.weight"])  # modules_to_save
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.count_nonzero(view.delta(norm)) == 0
    assert torch.allclose(view.delta(Q0), ref[Q0] - base.get(Q0), atol=1e-6)


def test_adapter_in_bf16_base_is_peft_within_one_ulp(ad, tmp_path):
    from surgery.adapters.view import open_adapter

    cfg = tiny_config("llama")
    b16 = save_checkpoint(tmp_path / "b16", random_state(cfg, 0), cfg, dtype=torch.bfloat16)
    view = open_adapter(ad["lora_task"], b16)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(b16, dtype=torch.bfloat16)
    ref = PeftModel.from_pretrained(m, ad["lora_task"]).merge_and_unload().state_dict()
    ours = view.get(Q0)
    assert ours.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps * ref[Q0].float().abs().clamp_min(1e-30)
    assert ((ours.float() - ref[Q0].float()).abs() <= ulp * 1.0001).all()


def test_plan_shows_adapter_and_manifest_hashes_it(ad, tmp_path):
    from surgery.pipeline import run
    from surgery.pipeline import build_plan
    from surgery.loader import load_recipe

    recipe = {"inputs": {"base": str(ad["base"]), "sw": {"adapter": str(ad["lora_task"]), "base": "base"}},
              "operations": [{"layer_swap": {"donor": "sw", "bottom": 2}}]}
    text = build_plan(load_recipe(recipe)).format()
    assert "base + ΔW(sw)" in text and "sw:adapter" in text
    run(recipe, tmp_path / "o")
    manifest = json.loads((tmp_path / "o" / "surgery_manifest.json").read_text())
    assert list(manifest["inputs"]["sw:adapter"]["sha256"]) == ["adapter_model.safetensors"]
    out, ref, basew = load(tmp_path / "o"), peft_merged(ad["base"], ad["lora_task"]), load(ad["base"])
    assert torch.equal(out[Q0], ref[Q0])                                    # swapped layer: adapter
    q5 = "model.layers.5.self_attn.q_proj.weight"
    assert torch.equal(out[q5], basew[q5]) and not torch.equal(ref[q5], basew[q5])  # kept layer: base


def test_arithmetic_and_blend_on_adapters(ad, tmp_path):
    inputs = {"base": str(ad["base"]), "a": {"adapter": str(ad["lora_task"]), "base": "base"},
              "b": {"adapter": str(ad["lora_tgt"]), "base": "base"}}
    out = run_recipe({"inputs": inputs, "operations": [{"arithmetic": {"expr": "base + 0.5*(a - base) - (b - base)"}}]},
                     tmp_path / "x")
    w, da, db = load(ad["base"]), peft_merged(ad["base"], ad["lora_task"]), peft_merged(ad["base"], ad["lora_tgt"])
    for k in (Q0, DOWN3):
        want = w[k] + 0.5 * (da[k] - w[k]) - (db[k] - w[k])
        assert torch.allclose(out[k], want, atol=1e-6)
    out = run_recipe({"inputs": inputs, "operations": [{"blend": {"weights": {"a": 1, "b": 3}}}]}, tmp_path / "y")
    assert torch.allclose(out[Q0], 0.25 * da[Q0] + 0.75 * db[Q0], atol=1e-6)


# ---------------------------------------------------------------------------- MAD-X stacking

def test_madx_stack_equals_peft_merging_both(ad, tmp_path):
    def madx(lang):
        return run_recipe({"inputs": {"base": str(ad["base"]), "lang": {"adapter": str(ad[lang]), "base": "base"},
                                      "task": {"adapter": str(ad["lora_task"]), "base": "base"}},
                           "operations": [{"apply_adapters": {"adapters": ["lang", "task"]}}]}, tmp_path / lang)

    out = madx("lora_rs")
    ref = peft_merged(ad["base"], ad["lora_rs"], ad["lora_task"])
    for k in ref:
        assert torch.equal(out[k], ref[k]), k
    # swapping the language adapter: only what the language adapters touch changes
    other = madx("lora_lang2")
    ref2 = peft_merged(ad["base"], ad["lora_lang2"], ad["lora_task"])
    assert all(torch.equal(other[k], ref2[k]) for k in ref2)
    k_proj = "model.layers.2.self_attn.k_proj.weight"  # only lora_rs touches it
    assert not torch.equal(out[k_proj], other[k_proj]) and torch.equal(other[k_proj], load(ad["base"])[k_proj])


def test_apply_adapters_weights(ad, tmp_path):
    out = run_recipe({"inputs": {"base": str(ad["base"]), "t": {"adapter": str(ad["lora_task"]), "base": "base"}},
                      "operations": [{"apply_adapters": {"adapters": ["t"], "weights": [0.5]}}]}, tmp_path / "w")
    w, ref = load(ad["base"]), peft_merged(ad["base"], ad["lora_task"])
    assert torch.allclose(out[Q0] - w[Q0], 0.5 * (ref[Q0] - w[Q0]), atol=1e-6)


def test_adapter_of_a_bare_model_maps_to_causal_lm_names(ad, tmp_path):
    """An adapter trained on LlamaModel (keys without 'model.') applies to a LlamaForCausalLM checkpoint."""
    bare = _copy(ad["lora_task"], tmp_path / "bare", tensors=lambda t: {
        k.replace("base_model.model.model.", "base_model.model."): v for k, v in t.items()})
    from surgery.adapters.view import open_adapter

    view = open_adapter(bare, ad["base"])
    assert torch.equal(view.get(Q0), peft_merged(ad["base"], ad["lora_task"])[Q0])


def test_per_layer_change_through_checkpoint_interface(ad):
    """What an analysis module does with (base, expert) works with (base, adapter)."""
    from surgery.adapters.view import open_adapter
    from surgery.io.checkpoint import Checkpoint
    from surgery.core.layout import Layout

    base = Checkpoint.open(ad["base"])
    for view in (open_adapter(ad["lora_lang2"], base), open_adapter(ad["ia3_task"], base)):
        layout = Layout.for_checkpoint(view)
        change: dict = {}
        for name in view.keys():
            info = layout.info(name)
            d = float((view.get(name).float() - base.get(name).float()).norm())
            change.setdefault((info.layer, info.kind), 0.0)
            change[(info.layer, info.kind)] += d
        touched = {k for k, v in change.items() if v > 0}
        want = {"attn_q", "mlp_up"} if view.peft_type == "LORA" else {"attn_k", "attn_v", "mlp_down"}
        assert touched == {(layer, kind) for layer in range(8) for kind in want}


def test_adapter_recipient_with_stack_follows_source_layers(ad, tmp_path):
    """stack repeats source layers 6-7 as output layers 8-9: they get the adapter's layer-6/7 ΔW."""
    out = run_recipe({"inputs": {"base": str(ad["base"]), "sw": {"adapter": str(ad["lora_task"]), "base": "base"}},
                      "recipient": "sw", "stack": [{"layers": "0-7"}, {"layers": "6-7"}]}, tmp_path / "s")
    ref = peft_merged(ad["base"], ad["lora_task"])
    for out_layer, src in ((8, 6), (9, 7), (3, 3)):
        n = f"model.layers.{out_layer}.self_attn.q_proj.weight"
        assert torch.equal(out[n], ref[f"model.layers.{src}.self_attn.q_proj.weight"]), n
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 10
def _chain(w, *terms):
    """w + (B·A)·s for each (adapter dir, module, factor), in order, as the lora op computes it."""
    out = w.float()
    for adapter, module, factor in terms:
        t = raw(adapter)
        cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
        scale = cfg["rank_pattern"].get(module, cfg["lora_alpha"]) / cfg["rank_pattern"].get(module, cfg["r"])
        a = t[f"base_model.model.{module}.lora_A.weight"].float()
        b = t[f"base_model.model.{module}.lora_B.weight"].float()
        out = out + (b @ a) * (scale * factor)
    return out


@pytest.mark.parametrize("recipe", ["madx_adapters.yaml", "adamergex_adapters.yaml"])
def test_example_recipes_run_on_the_demo(demo_dir, tmp_path, recipe):
    from surgery.pipeline import run

    ck = demo_dir / "checkpoints"
    (tmp_path / "recipes").mkdir()
    shutil.copy(Path(__file__).parents[2] / "recipes" / recipe, tmp_path / "recipes" / recipe)
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "checkpoints").symlink_to(ck)  # the recipes say ../demo/checkpoints
    out = load(run(tmp_path / "recipes" / recipe, tmp_path / "out").output)
    w = load(ck / "base")
    n = "model.layers.6.mlp.up_proj.weight"
    m = n[: -len(".weight")]
    if recipe.startswith("madx"):
        want = _chain(w[n], (ck / "lora-swahili", m, 1.0), (ck / "lora-math", m, 1.0))
    else:
        want = _chain(w[n], (ck / "lora-math", m, 1.0), (ck / "lora-swahili", m, 1.0), (ck / "lora-english", m, -1.0))
    assert torch.equal(out[n], want.to(torch.bfloat16))
    assert torch.equal(out["model.embed_tokens.weight"], w["model.embed_tokens.weight"])


def test_demo_adapters_carry_the_experts_updates(demo_dir):
    """The demo LoRAs are the experts' rank-4 updates: where an expert moved a lot, the LoRA is close."""
    report = json.loads((demo_dir / "checkpoints" / "lora-swahili" / "surgery_extract.json").read_text())
    by_layer = {row["layer"]: row["max_rel_error"] for row in report["layers"]}
    assert by_layer[0] < 0.02 and by_layer[7] < 0.02   # 30 % updates: only bf16 rounding is lost
    assert by_layer[3] > by_layer[0]                    # 2 % updates: bf16 rounding weighs more
