"""Mixture-of-experts checkpoints in surgery's own recipes: the stored layout kept, ``select: {experts: [...]}``,
what ``surgery plan`` shows, and every bad input (the fused reading and mergekit parity: test_moe.py)."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import load, raw_bytes, run_cli, save_checkpoint
from moe_kit import MK_CONFIGS, PROJ, errors, expert_names, saved_model, write

from surgery.core.experts import format_experts


# ---------------------------------------------------------------------------- surgery's own recipes

def test_own_recipe_merges_per_expert_as_stored(moe, tmp_path):
    """A surgery recipe keeps the stored layout: the output has the per-expert names, and each expert
    tensor is the merge of that tensor alone."""
    from mergekit.merge_methods.api import merge_tensors

    from surgery import run

    recipe = write(tmp_path, "r.yaml", """
        inputs: {{base: {base}, a: {a}, b: {b}}}
        operations:
          - merge:
              method: ties
              base: base
              models: {{a: {{weight: 0.6, density: 0.5}}, b: {{weight: 0.4, density: 0.7}}}}
    """, **moe)
    run(recipe, tmp_path / "out")
    out, ins = load(tmp_path / "out"), {m: load(moe[m]) for m in ("a", "b", "base")}
    assert sorted(out) == sorted(ins["base"])
    name = expert_names(moe["arch"], 1, 2)[0]
    want = merge_tensors([ins[m][name] for m in ("a", "b", "base")], "ties",
                         parameters={"weight": {"a": 0.6, "b": 0.4}, "density": {"a": 0.5, "b": 0.7}},
                         ids=["a", "b", "base"], base_index=2, name=name)
    assert raw_bytes(out[name]) == raw_bytes(want.to(torch.bfloat16))


def test_select_experts_takes_only_those_experts(moe, tmp_path):
    """experts: [0, -1] (-1: the last) in layer 1: those experts' tensors are the donor's bytes, everything else
    (other experts, other layers, attention, router, norms) the recipient's."""
    from surgery import run

    recipe = write(tmp_path, "r.yaml", """
        inputs: {{base: {base}, donor: {donor}}}
        operations:
          - take: {{from: donor, select: {{layers: 1, experts: [0, -1]}}}}
    """, **moe)
    run(recipe, tmp_path / "out")
    out, base, donor = load(tmp_path / "out"), load(moe["base"]), load(moe["donor"])
    chosen = set(expert_names(moe["arch"], 1, 0) + expert_names(moe["arch"], 1, 3))
    assert len(chosen) == 6
    for name in out:
        want = donor[name] if name in chosen else base[name]
        assert raw_bytes(out[name]) == raw_bytes(want), name
        if name not in chosen:
            assert not torch.equal(donor[name], base[name]), name  # the test would see a wrong take


def test_select_experts_on_fused_tensors_splices_their_slices(moe, tmp_path):
    """With experts fused, experts: [1, 2] changes those experts' slices of the stacked tensors only."""
    from surgery import run

    recipe = write(tmp_path, "r.yaml", """
        inputs: {{base: {base}, donor: {donor}}}
        experts: fused
        operations:
          - take: {{from: donor, select: {{experts: [1, 2]}}}}
    """, **moe)
    run(recipe, tmp_path / "out")
    out = load(tmp_path / "out")
    arch, base, donor = moe["arch"], load(moe["base"]), load(moe["donor"])
    for layer in (0, 1):
        gate_up = out[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = out[f"model.layers.{layer}.mlp.experts.down_proj"]
        for e in range(4):
            src = donor if e in (1, 2) else base
            gate, up, dn = (src[n] for n in expert_names(arch, layer, e))
            assert raw_bytes(gate_up[e]) == raw_bytes(torch.cat([gate, up])), (layer, e)
            assert raw_bytes(down[e]) == raw_bytes(dn), (layer, e)
    attn = "model.layers.0.self_attn.q_proj.weight"
    assert raw_bytes(out[attn]) == raw_bytes(base[attn])
    assert not any(".experts.0." in n for n in out)


def test_plan_shows_experts(moe, tmp_path):
    recipe = write(tmp_path, "r.yaml", """
        inputs: {{base: {base}, donor: {donor}}}
        operations:
          - take: {{from: donor, select: {{layers: 1, experts: [0, 3]}}}}
    """, **moe)
    r = run_cli("plan", recipe)
    assert r.returncode == 0, r.stderr
    assert "experts: 4 per layer, one tensor per expert as stored" in r.stdout
    lines = r.stdout.splitlines()
    row = lines.index(next(line for line in lines if line.startswith("layer 1")))
    block = [lines[row][len("layer 1"):], lines[row + 1]]   # the layer's two rows: labels ← source
    rows = {src.split()[0]: set(re.split(r",(?!\d)", labels.strip())) for labels, src in (b.split("←") for b in block)}
    # the router (kind mlp_router) is shown with the MLP, as is Qwen2-MoE's shared expert; its shared_expert_gate
    # has no kind of its own ("other")
    other = {"other"} if moe["arch"] == "qwen2_moe" else set()
    assert rows == {"donor": {"experts 0,3"}, "base": {"experts 1-2", "mlp", "norm", "attn"} | other}, block
    fused = write(tmp_path, "f.yaml", """
        inputs: {{base: {base}, donor: {donor}}}
        experts: fused
        operations:
          - take: {{from: donor, select: {{layers: 1, experts: [0, 3]}}}}
    """, **moe)
    r = run_cli("plan", fused)
    assert r.returncode == 0, r.stderr
    assert "experts ← base[4 experts: " in " ".join(r.stdout.split())
    assert sum(" with experts 0,3 from donor[4 experts: " in line for line in r.stdout.splitlines()) == 2
    mk = write(tmp_path, "mk.yml", MK_CONFIGS["ties"], **moe)
    r = run_cli("plan", mk)
    assert r.returncode == 0, r.stderr
    assert "experts of 'base', 'a', 'b' read fused, as mergekit reads them: 4 experts per layer stacked" in r.stdout
    assert "a[4 experts: " in r.stdout


# ---------------------------------------------------------------------------- errors

def test_expert_out_of_range_is_one_line(moe, tmp_path):
    recipe = write(tmp_path, "r.yaml", """
        inputs: {{base: {base}, donor: {donor}}}
        operations:
          - take: {{from: donor, select: {{experts: [0, 4]}}}}
    """, **moe)
    r = run_cli("run", recipe, "-o", tmp_path / "out")
    assert r.returncode == 1
    assert errors(r) == (f"error: {recipe}:4: operations.0.take.select.experts.1: expert 4 is out of range: "
                        "the model has 4 experts per layer (0-3)\n")
    assert not (tmp_path / "out").exists()


def test_experts_on_a_dense_model_is_one_line(tmp_path):
    from helpers import random_state, tiny_config

    cfg = tiny_config("llama")
    save_checkpoint(tmp_path / "m", random_state(cfg), cfg)
    recipe = write(tmp_path, "r.yaml", """
        inputs: {{m: {m}}}
        operations:
          - blend: {{weights: {{m: 0.5}}, select: {{experts: [0]}}}}
    """, m=tmp_path / "m")
    r = run_cli("run", recipe, "-o", tmp_path / "out")
    assert r.returncode == 1
    assert r.stderr == (f"error: {recipe}:4: operations.0.blend.select.experts: #1 blend selects experts, but the "
                        "model has none (no per-expert or stacked expert tensor)\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["missing", "dtype", "shape"])
def test_incomplete_or_mixed_experts_are_one_line(moe, tmp_path, damage):
    """Read fused, a checkpoint missing one expert's tensor, or mixing dtypes within a layer's experts, is
    refused with the checkpoint and the tensor named."""
    arch = moe["arch"]
    state = load(moe["a"])
    gate = expert_names(arch, 1, 2)[0]
    rows, cols = state[gate].shape
    if damage == "missing":
        del state[gate]
    elif damage == "shape":
        state[gate] = state[gate][:-1].clone()
    else:
        state[gate] = state[gate].float()
    bad = save_checkpoint(tmp_path / "bad", state, moe["cfg"], dtype=torch.bfloat16)
    if damage == "dtype":  # save_checkpoint casts every tensor: write the float32 one back
        from safetensors.torch import save_file

        save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    config = write(tmp_path, "c.yml", MK_CONFIGS["ties"], a=bad, b=moe["b"], base=moe["base"])
    r = run_cli("run", config, "-o", tmp_path / "out")
    assert r.returncode == 1
    fused = "model.layers.1.mlp.experts.gate_up_proj"
    what = {"missing": f"{fused} needs {PROJ[arch][0]} of every expert (0-3), but expert 2's is missing",
            "dtype": f"the expert tensors of {fused} mix dtypes (BF16, F32)",
            "shape": f"{fused}: expert 2's tensors [[{rows - 1}, {cols}], [{rows}, {cols}]] don't line up with "
                     f"expert 0's [[{rows}, {cols}], [{rows}, {cols}]]"}[damage]
    assert errors(r).startswith("error: ") and errors(r).count("\n") == 1, r.stderr
    assert errors(r).rstrip().endswith(f"{bad}: {what}"), r.stderr
    assert not (tmp_path / "out").exists()


def test_format_experts():
    assert format_experts([5, 0, 1, 2]) == "0-2,5"
    assert format_experts([3]) == "3"


@pytest.mark.parametrize("text,message", [
    ("experts: fusd\noperations:\n  - take: {{from: base, select: {{layers: 0}}}}\n",
     "{r}:2: experts: Input should be 'stored' or 'fused' (got 'fusd')"),
    ("operations:\n  - take: {{from: base, select: {{experts: [x]}}}}\n",
     "{r}:3: operations.0.take.select.experts.0: Input should be a valid integer, unable to parse string as an "
     "integer (got 'x')"),
])
def test_bad_experts_values_are_one_line(moe, tmp_path, text, message):
    recipe = write(tmp_path, "r.yaml", "inputs: {{base: {base}}}\n" + text, **moe)
    r = run_cli("validate", recipe)
    assert r.returncode == 1
    assert errors(r) == f"error: {message.format(r=recipe)}\n"


def test_model_type_without_fused_layout_stays_per_expert(tmp_path):
    """OLMoE has no fused layout in the data: read 'fused', its experts stay as stored, and the plan says so."""
    from surgery import build_plan

    state, _ = saved_model("olmoe", tmp_path / "m")
    recipe = write(tmp_path, "r.yaml", """
        inputs: {{m: {m}}}
        experts: fused
        operations:
          - take: {{from: m, select: {{experts: [1]}}}}
    """, m=tmp_path / "m")
    plan = build_plan(recipe)
    assert sorted(e.name for e in plan.entries) == sorted(state)
    assert plan.annotations == ["experts of 'm' stay one tensor per expert: no fused layout is known for 'olmoe' "
                                "(surgery/_data/experts.json)"]
    assert sorted(e.name for e in plan.entries if e.rule == "#1 take") == \
        sorted(n for n in state if ".experts.1." in n) != []
