"""Mixture-of-experts checkpoints (tiny Mixtral, Qwen2-MoE and Qwen3-MoE, saved one tensor per expert as
transformers saves them): mergekit configs give mergekit-yaml's bytes (experts fused, as mergekit reads
them), surgery's own recipes keep the stored layout, and ``select: {experts: [...]}`` picks experts."""

from __future__ import annotations

import re
import textwrap

import pytest
import torch
from helpers import load, perturb, raw_bytes, run_cli, save_checkpoint

from surgery.core.experts import FusedExperts, experts_data, expert_count, format_experts

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
# per-expert names of expert {e} in layer {l}: (gate, up, down)
PER_EXPERT = {"mixtral": "model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight",
              "qwen2_moe": "model.layers.{l}.mlp.experts.{e}.{w}.weight",
              "qwen3_moe": "model.layers.{l}.mlp.experts.{e}.{w}.weight"}
PROJ = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
        "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}


def moe_config(arch: str):
    import transformers as tf

    if arch == "mixtral":
        return tf.MixtralConfig(**SMALL, intermediate_size=48, num_local_experts=4,
                                architectures=["MixtralForCausalLM"])
    if arch == "qwen2_moe":  # mergekit has no architecture file for it and infers one from the fused names
        return tf.Qwen2MoeConfig(**SMALL, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                 shared_expert_intermediate_size=48, architectures=["Qwen2MoeForCausalLM"])
    if arch == "olmoe":  # no fused layout in _data/experts.json
        return tf.OlmoeConfig(**SMALL, intermediate_size=24, num_experts=4, architectures=["OlmoeForCausalLM"])
    return tf.Qwen3MoeConfig(**SMALL, intermediate_size=48, moe_intermediate_size=24, head_dim=8, num_experts=4,
                             architectures=["Qwen3MoeForCausalLM"])


def saved_model(arch: str, folder):
    """A random model as ``save_pretrained`` writes it (experts one tensor each), and its in-memory state
    (transformers v5: experts fused)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(arch))
    model.save_pretrained(folder)
    return load_file(str(folder / "model.safetensors")), {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "qwen3_moe"])
def moe(request, tmp_path_factory):
    """{arch, base, a, b, donor (paths), state (base's per-expert tensors), memory (its fused state)}."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    state, memory = saved_model(arch, root / "saved")
    cfg = moe_config(arch)
    out = {"arch": arch, "root": root, "state": state, "memory": memory, "cfg": cfg}
    for i, name in enumerate(("a", "b")):
        out[name] = save_checkpoint(root / name, perturb(state, None, 0.02, seed=i + 1), cfg, dtype=torch.bfloat16)
    out["base"] = save_checkpoint(root / "base", state, cfg, dtype=torch.bfloat16)
    out["donor"] = save_checkpoint(root / "donor", perturb(state, None, 0.5, seed=7), cfg, dtype=torch.bfloat16)
    return out


def write(folder, name: str, text: str, **paths) -> str:
    path = folder / name
    path.write_text(textwrap.dedent(text).format(**{k: str(v) for k, v in paths.items()}))
    return str(path)


def errors(r) -> str:
    """stderr without the layout's warning for Qwen2-MoE (not in _data/layout.json's layer prefixes; mergekit
    has no architecture file for it either)."""
    return "".join(line for line in r.stderr.splitlines(keepends=True)
                   if not line.startswith("warning: ") or "is not in the layout tables" not in line)


def expert_names(arch: str, layer: int, expert: int) -> list[str]:
    return [PER_EXPERT[arch].format(l=layer, e=expert, w=w) for w in PROJ[arch]]


# ---------------------------------------------------------------------------- the fused reading

def test_fused_view_is_transformers_in_memory_state(moe):
    """Read fused, a per-expert checkpoint has exactly the names and values of the model in memory (what
    transformers' conversion mapping builds and mergekit merges), so the layout data is transformers'."""
    from surgery.io.checkpoint import Checkpoint

    ck = Checkpoint.open(moe["root"] / "saved")
    view = FusedExperts("m", ck, "m:stored", experts_data()["fused"][moe["arch"]])
    assert sorted(view.keys()) == sorted(moe["memory"])
    for name in view.keys():
        assert torch.equal(view.get(name), moe["memory"][name]), name
        assert tuple(view.meta[name].shape) == tuple(moe["memory"][name].shape)
    assert len(view.fused) == 4  # gate_up and down of 2 layers
    assert expert_count(ck.config, ck.keys()) == 4


def test_data_agrees_with_transformers_conversion_mapping():
    """Every fused layout in _data/experts.json is what transformers' own mapping for that model type says."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    for model_type, layout in experts_data()["fused"].items():
        mapping = get_checkpoint_conversion_mapping(model_type)
        renames = [(r.source_patterns[0], r.target_patterns[0]) for r in mapping if isinstance(r, WeightRenaming)]
        assert renames == [tuple(r) for r in layout["renames"]], model_type
        converters = {c.target_patterns[0].strip("."): [p.strip(".").replace("*", "{e}") for p in c.source_patterns]
                      for c in mapping if not isinstance(c, WeightRenaming)}
        ours = {t["name"]: t["parts"] for t in layout["tensors"]}
        assert {k.split("mlp.")[-1]: [p.split("mlp.")[-1] for p in v] for k, v in ours.items()} == \
            {k.split("mlp.")[-1]: [p.split("mlp.")[-1] for p in v] for k, v in converters.items()}, model_type


# ---------------------------------------------------------------------------- parity with mergekit-yaml

MK_CONFIGS = {
    "ties": """
        models:
          - model: {a}
            parameters: {{weight: 0.6, density: 0.5}}
          - model: {b}
            parameters: {{weight: 0.4, density: 0.7}}
        merge_method: ties
        base_model: {base}
        dtype: bfloat16
    """,
    "linear": """
        models:
          - model: {a}
            parameters: {{weight: 0.3}}
          - model: {b}
            parameters: {{weight: 0.7}}
        merge_method: linear
    """,
    "task_arithmetic": """
        models:
          - model: {a}
            parameters: {{weight: [0.2, 0.9]}}
          - model: {b}
            parameters: {{weight: 0.5}}
        merge_method: task_arithmetic
        base_model: {base}
        dtype: float32
        out_dtype: bfloat16
    """,
    # a filter on mergekit's names: Mixtral's router and experts are under 'mlp.' only once read fused
    "slerp_filter": """
        slices:
          - sources:
              - {{model: {a}, layer_range: [0, 2]}}
              - {{model: {b}, layer_range: [0, 2]}}
        merge_method: slerp
        base_model: {a}
        parameters:
          t: [{{filter: mlp, value: 0.3}}, {{value: 0.6}}]
        dtype: float32
    """,
    "passthrough_frankenmerge": """
        slices:
          - sources: [{{model: {a}, layer_range: [0, 2]}}]
          - sources: [{{model: {b}, layer_range: [1, 2]}}]
        merge_method: passthrough
        dtype: bfloat16
    """,
}


@pytest.mark.slow
def test_mergekit_configs_match_mergekit_yaml(moe, tmp_path):
    """ties, linear, task_arithmetic, slerp with a filter and a passthrough frankenmerge on per-expert checkpoints:
    the bytes, names and config mergekit-yaml writes (fused experts, merged as one tensor per layer and
    projection)."""
    from test_mergekit_parity import assert_same_checkpoint, run_mergekit

    from surgery import run

    # mergekit has no architecture file for Qwen2-MoE: it infers one, and then takes the final norm and lm_head of
    # a frankenmerge from the first slice's model and leaves num_hidden_layers as it was (not an expert matter)
    skip = {"passthrough_frankenmerge"} if moe["arch"] == "qwen2_moe" else set()
    configs = {m: write(tmp_path, f"{m}.yml", text, **moe) for m, text in MK_CONFIGS.items() if m not in skip}
    run_mergekit([(c, tmp_path / f"mk_{m}", []) for m, c in configs.items()])
    for method, config in configs.items():
        run(config, tmp_path / f"ours_{method}")
        assert_same_checkpoint(tmp_path / f"mk_{method}", tmp_path / f"ours_{method}")
    out = load(tmp_path / "ours_ties")
    assert out["model.layers.1.mlp.experts.gate_up_proj"].shape[0] == 4
    if not skip:
        assert "model.layers.2.mlp.experts.down_proj" in load(tmp_path / "ours_passthrough_frankenmerge")


def test_fused_ties_takes_top_k_over_all_experts(moe, tmp_path):
    """A mergekit config's TIES merges the stacked experts as one tensor; the formula: mergekit's merge on the
    stacked tensors of every input (per expert, the top-k would differ)."""
    from mergekit.merge_methods.api import merge_tensors

    from surgery import run

    config = write(tmp_path, "ties.yml", MK_CONFIGS["ties"], **moe)
    run(config, tmp_path / "out")
    out = load(tmp_path / "out")
    arch = moe["arch"]
    name = "model.layers.1.mlp.experts.gate_up_proj"
    stacked = []
    for m in ("a", "b", "base"):
        st = load(moe[m])
        stacked.append(torch.stack([torch.cat([st[n] for n in expert_names(arch, 1, e)[:2]]) for e in range(4)]))
    params = {"weight": {"a": 0.6, "b": 0.4}, "density": {"a": 0.5, "b": 0.7}}
    want = merge_tensors(stacked, "ties", parameters=params, ids=["a", "b", "base"], base_index=2, name=name)
    assert raw_bytes(out[name]) == raw_bytes(want.to(torch.bfloat16))
    per_expert = [merge_tensors([s[e] for s in stacked], "ties", parameters=params, ids=["a", "b", "base"],
                                base_index=2, name=name) for e in range(4)]
    assert not torch.equal(torch.stack(per_expert).to(torch.bfloat16), out[name])


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
