"""mergekit configs behave as mergekit does where mergekit is lenient: a tied lm_head is skipped.

Bitwise parity of these configs with mergekit-yaml itself is in tests/test_mergekit_corpus.py (gpt2_small.yml).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import load, raw_bytes, save_checkpoint, tied_config, tied_state, tiny_config
from test_mergekit_parity import make_models, write_config

GPT2_SMALL = """
slices:
  - sources:
    - model: {gpt2}
      layer_range: [0, 6]
merge_method: passthrough
dtype: float16
"""
SCE = """
models:
  - model: {a}
  - model: {b}
merge_method: sce
base_model: {base}
parameters:
  select_topk: 0.5
  smooth: true
"""
PAD = """
models:
  - model: {a}
    parameters: {{weight: 0.6}}
  - model: {b}
    parameters: {{weight: 0.4}}
merge_method: linear
pad_to_multiple_of: 8
"""
LENIENT_TAIL = "; mergekit ignores it where it stands (--mergekit-lenient ignores it too, with a warning)"
IGNORED_TAIL = "; ignored, as mergekit ignores it where it stands"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tolerance_models")
    paths = make_models(root)
    cfg = tiny_config("gpt2", architectures=["GPT2LMHeadModel"])
    paths["gpt2"] = save_checkpoint(root / "gpt2", tied_state(cfg), cfg)
    cfg = tied_config("llama", architectures=["LlamaForCausalLM"])
    paths["tied"] = save_checkpoint(root / "tied", tied_state(cfg), cfg)
    paths["tied_b"] = save_checkpoint(root / "tied_b", tied_state(cfg, seed=1), cfg)
    return paths


def captured(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught]


# ---------------------------------------------------------------------------- defect 3: a tied lm_head

def test_gpt2_small_example_skips_the_tied_lm_head(models, tmp_path):
    """mergekit's examples/gpt2-small.yml: the last slice's merge of final norm and lm_head finds no lm_head
    (GPT-2 ties it to wte); mergekit skips that optional tensor, and so does surgery, with a line in the plan."""
    from surgery import build_plan, run

    path = write_config(tmp_path, "gpt2-small", GPT2_SMALL, models)
    plan, messages = captured(build_plan, path)
    assert not [m for m in messages if "lm_head" in m]  # mergekit says nothing: at most the plan's line
    assert "#2 merge: skipped, this model ties lm_head to the embeddings (tie_word_embeddings), so it has no " \
           "lm_head tensor (missing: skip)" in plan.annotations
    run(path, tmp_path / "out")
    donor, out = load(models["gpt2"]), load(tmp_path / "out")
    expected = {n: t for n, t in donor.items() if not n.startswith(("transformer.h.6.", "transformer.h.7."))}
    assert sorted(out) == sorted(expected) and "lm_head.weight" not in out
    for name, t in expected.items():  # passthrough in float16: the donor's values, as float16
        assert raw_bytes(out[name]) == raw_bytes(t.to(torch.float16)), name


def test_missing_skip_in_a_recipe_and_the_default_error(models):
    """A surgery recipe keeps the rule that a selection matching nothing is an error, unless it says
    `missing: skip` (as translated mergekit configs do)."""
    from surgery import SurgeryError, build_plan

    inputs = {"a": str(models["tied"]), "b": str(models["tied_b"])}
    select = {"modules": ["final_norm", "lm_head"]}
    with pytest.raises(SurgeryError) as e:
        build_plan({"inputs": inputs, "operations": [{"take": {"from": "b", "select": select}}]})
    assert str(e.value) == ("recipe: operations.0.take.select.modules: #1 take selects no tensor: this model ties "
                            "lm_head to the embeddings (tie_word_embeddings), so it has no lm_head tensor; select the "
                            "embeddings (modules: [embed]) to change both")
    plan = build_plan({"inputs": inputs, "operations": [
        {"take": {"from": "b", "select": {**select, "missing": "skip"}}},
        {"take": {"from": "b", "select": {"names": ["*.nothing.*"], "missing": "skip"}}}]})
    assert [e.name for e in plan.entries if e.rule == "#1 take"] == ["model.norm.weight"]
    assert plan.annotations == [
        "#1 take: skipped, this model ties lm_head to the embeddings (tie_word_embeddings), so it has no lm_head "
        "tensor (missing: skip)",
        "#2 take: skipped, no tensor name matches '*.nothing.*' (missing: skip)",
        "#2 take: skipped, no tensor matches all of {names: ['*.nothing.*']} (missing: skip)"]
    with pytest.raises(SurgeryError, match="missing"):
        build_plan({"inputs": inputs, "operations": [{"take": {"from": "b", "select": {"missing": "ignore"}}}]})
