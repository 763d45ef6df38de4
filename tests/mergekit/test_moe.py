"""Mixture-of-experts checkpoints (tiny Mixtral, Qwen2-MoE and Qwen3-MoE, saved one tensor per expert as
transformers saves them): the fused reading, and mergekit configs give mergekit-yaml's bytes (experts fused, as
mergekit reads them). Surgery's own recipes and ``select: {experts: [...]}``: test_moe_recipes.py."""

from __future__ import annotations


import pytest
import torch
from helpers import load, raw_bytes
from moe_kit import MK_CONFIGS, expert_names, write

from surgery.core.experts import FusedExperts, experts_data, expert_count


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
