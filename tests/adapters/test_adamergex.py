"""AdaMergeX on LoRA and (IA)³ adapters: the exact ΔW formula, adapter outputs peft loads, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_kit import DOWN3, Q0, _adamergex_inputs, _ops, peft_merged, raw, run_recipe

from helpers import load

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


# ---------------------------------------------------------------------------- AdaMergeX

def test_adamergex_lora_delta_is_exact_on_delta_w(ad, tmp_path):
    t = 0.7
    out = run_recipe({"inputs": _adamergex_inputs(ad, "lora"), "operations": _ops(t)}, tmp_path / "m")
    w = load(ad["base"])
    d = {n: {k: v - w[k] for k, v in peft_merged(ad["base"], ad[f"lora_{n}"]).items()} for n in ("task", "tgt", "src")}
    for k in (Q0, DOWN3, "model.layers.7.mlp.gate_proj.weight"):
        want = d["task"][k] + t * (d["tgt"][k] - d["src"][k])
        assert torch.allclose(out[k] - w[k], want, atol=1e-6), k
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], w["model.layers.0.mlp.up_proj.weight"])


def test_adamergex_lora_factors_follows_original(ad, tmp_path):
    t = 0.5
    out = run_recipe({"inputs": _adamergex_inputs(ad, "lora"), "operations": _ops(t, "factors")}, tmp_path / "f")
    w, r = load(ad["base"]), {n: raw(ad[f"lora_{n}"]) for n in ("task", "tgt", "src")}
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    a = r["task"][key.format("A")] + t * (r["tgt"][key.format("A")] - r["src"][key.format("A")])
    b = r["task"][key.format("B")] + t * (r["tgt"][key.format("B")] - r["src"][key.format("B")])
    assert torch.allclose(out[Q0], w[Q0] + (b @ a) * 2.0, atol=1e-6)  # scaling 8/4
    delta = run_recipe({"inputs": _adamergex_inputs(ad, "lora"), "operations": _ops(t)}, tmp_path / "d")
    assert not torch.allclose(out[Q0], delta[Q0], atol=1e-4)  # the two modes really differ


def test_adamergex_ia3_is_multiplicative(ad, tmp_path):
    t = 0.8
    out = run_recipe({"inputs": _adamergex_inputs(ad, "ia3"), "operations": _ops(t)}, tmp_path / "i")
    w, r = load(ad["base"]), {n: raw(ad[f"ia3_{n}"]) for n in ("task", "tgt", "src")}
    for k, lk in ((DOWN3, "base_model.model.model.layers.3.mlp.down_proj.ia3_l"),
                  ("model.layers.1.self_attn.v_proj.weight", "base_model.model.model.layers.1.self_attn.v_proj.ia3_l")):
        l_new = r["task"][lk] * (t * (r["tgt"][lk] / r["src"][lk] - 1.0) + 1.0)
        assert torch.equal(out[k], w[k] * l_new), k
    assert r["task"][lk].shape == (16, 1)  # attention: rows; feed-forward (down_proj): (1, 48) columns


@pytest.mark.parametrize("mode", ["delta", "factors"])
def test_adamergex_adapter_output_loads_in_peft(ad, tmp_path, mode):
    from surgery.adapters.adamergex import adamergex_adapter

    t = 0.6
    res = adamergex_adapter(ad["lora_task"], ad["lora_tgt"], ad["lora_src"], tmp_path / "ad", t=t, mode=mode)
    assert res.peft_type == "LORA"
    merged = peft_merged(ad["base"], tmp_path / "ad")
    recipe = run_recipe({"inputs": _adamergex_inputs(ad, "lora"), "operations": _ops(t, mode)}, tmp_path / "r")
    for k in (Q0, DOWN3):
        assert torch.allclose(merged[k], recipe[k], atol=1e-6), k
    if mode == "delta":
        assert set(res.ranks.values()) == {12}
    else:
        new, r = raw(tmp_path / "ad"), {n: raw(ad[f"lora_{n}"]) for n in ("task", "tgt", "src")}
        key = "base_model.model.model.layers.4.mlp.gate_proj.lora_A.weight"
        assert torch.equal(new[key], r["task"][key] + t * (r["tgt"][key] - r["src"][key]))


def test_adamergex_ia3_adapter_output(ad, tmp_path):
    from surgery.adapters.adamergex import adamergex_adapter

    t = 1.3
    adamergex_adapter(ad["ia3_task"], ad["ia3_tgt"], ad["ia3_src"], tmp_path / "ia", t=t)
    new, r = raw(tmp_path / "ia"), {n: raw(ad[f"ia3_{n}"]) for n in ("task", "tgt", "src")}
    for k in new:
        assert torch.equal(new[k], r["task"][k] * (t * (r["tgt"][k] / r["src"][k] - 1.0) + 1.0)), k
    merged, w = peft_merged(ad["base"], tmp_path / "ia"), load(ad["base"])
    lk = "base_model.model.model.layers.3.mlp.down_proj.ia3_l"
    assert torch.equal(merged[DOWN3], w[DOWN3] * new[lk])


def test_adamergex_cli(ad, tmp_path):
    from click.testing import CliRunner

    from surgery.cli import cli
    res = CliRunner().invoke(cli, ["adamergex", str(ad["lora_task"]), str(ad["lora_tgt"]), str(ad["lora_src"]),
                                   "-o", str(tmp_path / "c"), "-t", "0.5", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ranks"]["model.layers.0.self_attn.q_proj"] == 12
    res = CliRunner().invoke(cli, ["adamergex", str(ad["lora_task"]), str(ad["ia3_tgt"]), str(ad["lora_src"]),
                                   "-o", str(tmp_path / "e")])
    assert res.exit_code == 1 and "error: AdaMergeX needs adapters of one type" in res.output
