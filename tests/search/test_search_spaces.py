"""Search spaces: analysis-guided ranked swaps, per-layer variables, a choice of whole operations."""


import pytest
import torch
from search_kit import write_search

import surgery
from surgery.errors import RecipeError


# ---------------------------------------------------------------------------- spaces

@pytest.mark.slow
def test_analysis_guided_space_ranked_swap_count(swap_world, tmp_path):
    root, _ = swap_world
    path = write_search(root, "ranked.yaml", """\
recipe:
  inputs: {math: math, sw: swahili}
  recipient: math
  operations:
    - ranked_layer_swap: {donor: sw, k: {int: [1, 3]}, split: outer}
objective:
  - {data: gen.txt, metric: bits_per_byte, weight: -1}
sampler: grid
trials: 3
""")
    result = surgery.search(path, tmp_path)
    assert sorted(r["operations.0.ranked_layer_swap.k"] for r in result.trials) == [1, 2, 3]
    assert all(r["state"] == "complete" and r["value"] < 0 for r in result.trials)
    assert isinstance(result.best_recipe["operations"][0]["ranked_layer_swap"]["k"], int)


def test_per_layer_variables_split_a_merge_by_layer_group(demo_dir, tmp_path):
    from surgery.search.space import resolve

    ck = demo_dir / "checkpoints"
    text = f"""\
recipe:
  inputs: {{math: {ck / 'math'}, sw: {ck / 'swahili'}}}
  operations:
    - merge:
        method: linear
        models:
          math: {{weight: {{float: [0, 1], layer_granularity: 4}}}}
          sw: {{weight: 0.5}}
        parameters: {{normalize: false}}
objective:
  - {{data: {ck.parent / 'doc.txt'}, metric: perplexity}}
"""
    (ck.parent / "doc.txt").write_text("hello world\n")
    spec = surgery.load_search(write_search(tmp_path, "s.yaml", text))
    assert spec.param_names() == ["operations.0.merge.models.math.weight[0-3]",
                                  "operations.0.merge.models.math.weight[4-7]"]
    plain = resolve(spec.recipe, spec.variables, dict(zip(spec.param_names(), [0.25, 0.75])))
    merges = [op["merge"] for op in plain["operations"]]
    assert [m["models"]["math"]["weight"] for m in merges] == [0.25, 0.75, 0.75]
    assert [m.get("select") for m in merges] == [None, {"layers": "4-7"},
                                                 {"modules": ["final_norm", "lm_head"], "missing": "skip"}]
    from safetensors.torch import load_file

    got = load_file(surgery.run(plain, tmp_path / "out").output / "model.safetensors")
    a, b = load_file(ck / "math" / "model.safetensors"), load_file(ck / "swahili" / "model.safetensors")
    for name, w in (("model.layers.1.mlp.up_proj.weight", 0.25), ("model.layers.6.mlp.up_proj.weight", 0.75),
                    ("model.embed_tokens.weight", 0.25), ("lm_head.weight", 0.75), ("model.norm.weight", 0.75)):
        want = (w * a[name].float() + 0.5 * b[name].float()).to(torch.bfloat16)
        assert torch.allclose(got[name].float(), want.float(), rtol=1e-2, atol=1e-3), name


def test_a_choice_of_whole_operations_is_sampled_by_index(swap_world):
    root, _ = swap_world
    path = write_search(root, "ops.yaml", """\
recipe:
  inputs: {math: math, sw: swahili}
  recipient: math
  operations:
    - choice:
        - layer_swap: {donor: sw, bottom: 2}
        - take: {from: sw, select: {layers: '0-1'}}
objective:
  - {data: gen.txt, metric: perplexity, weight: -1}
sampler: grid
""")
    spec = surgery.load_search(path)
    assert spec.grid_space() == {"operations.0": [0, 1]}
    assert spec.resolve({"operations.0": 1})["operations"] == [{"take": {"from": "sw", "select": {"layers": "0-1"}}}]
    bad = write_search(root, "ops-bad.yaml", path.read_text().replace("take: {from: sw", "take: {form: sw"))
    with pytest.raises(RecipeError, match=r"ops-bad.yaml:5: recipe.operations.0: the choice variable's value .* is not "
                                          r"valid here: .*"
                                          r"unknown key 'form'"):
        surgery.load_search(bad)


def test_per_layer_groups_on_a_tied_model_skip_its_missing_lm_head(tmp_path):
    """A tied model (SmolLM2's shape) has no lm_head tensor: the last group's copy gives the final norm its
    values and skips lm_head, as mergekit skips it in a genome's slices config."""
    from helpers import save_checkpoint, tied_config, tied_state

    from surgery.search.space import resolve

    cfg = tied_config("llama", architectures=["LlamaForCausalLM"])
    a, b = (save_checkpoint(tmp_path / n, tied_state(cfg, seed=i), cfg) for i, n in enumerate("ab"))
    (tmp_path / "doc.txt").write_text("hello world\n")
    spec = surgery.load_search(write_search(tmp_path, "s.yaml", f"""\
recipe:
  inputs: {{a: {a}, b: {b}}}
  operations:
    - merge: {{method: linear, models: {{a: {{weight: {{float: [0, 1], layer_granularity: 4}}}}, b: {{weight: 1}}}}}}
objective:
  - {{data: doc.txt, metric: perplexity}}
"""))
    plan = surgery.build_plan(resolve(spec.recipe, spec.variables, dict(zip(spec.param_names(), [0.25, 0.75]))))
    assert "#3 merge: skipped, this model ties lm_head to the embeddings (tie_word_embeddings), so it has no " \
           "lm_head tensor (missing: skip)" in plan.annotations
    rules = {e.name: e.rule for e in plan.entries}
    assert (rules["model.norm.weight"], rules["model.layers.5.mlp.up_proj.weight"]) == ("#3 merge", "#2 merge")
    assert "lm_head.weight" not in rules
