"""mergekit configs behave as mergekit does where mergekit is lenient: a tied lm_head is skipped, and keys
mergekit ignores are refused with where they belong, or (``--mergekit-lenient``) ignored with a warning.

Bitwise parity of these configs with mergekit-yaml itself is in tests/mergekit/test_mergekit_corpus.py
(gpt2_small.yml, sce_smooth.yml, top_level_pad_to_multiple_of.yml).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import load, raw_bytes, run_cli, save_checkpoint, tied_config, tied_state, tiny_config
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


# ---------------------------------------------------------------------------- defect 4: keys mergekit ignores

LINEAR = PAD.replace("pad_to_multiple_of: 8\n", "")
PATTERN = SCE.replace("  select_topk: 0.5\n", "").replace("smooth: true", "select_topk: [{{pattern: mlp, value: 0.3}}]")


# (config, the text mergekit reads: without the key, where the error points, the message)
@pytest.mark.parametrize("text, clean, where, message", [
    (PAD, PAD.replace("pad_to_multiple_of: 8\n", ""), "mk.yml:8: pad_to_multiple_of",
     "unknown key 'pad_to_multiple_of' in a mergekit config: it belongs in tokenizer.pad_to_multiple_of"),
    (SCE, SCE.replace("  smooth: true\n", ""), "mk.yml:9: parameters.smooth",
     "unknown parameter 'smooth' for merge method 'sce' (sce takes only int8_mask, select_topk)"),
    (LINEAR.replace("{{weight: 0.6}}", "{{weight: 0.6}}\n    layer_range: [0, 8]"), LINEAR,
     "mk.yml:5: models.0.layer_range",
     "unknown key 'layer_range' in a model entry: it belongs in slices[].sources[].layer_range"),
    (PATTERN, PATTERN.replace("pattern: mlp, ", ""), "mk.yml:8: parameters.select_topk.0.pattern",
     "unknown key 'pattern' in a {value, filter} condition; did you mean 'filter'? (without a filter the condition "
     "matches every tensor)"),
    (LINEAR.replace("merge_method", "merge_methd: ties\nmerge_method"), LINEAR, "mk.yml:7: merge_methd",
     "unknown key 'merge_methd' in a mergekit config; did you mean 'merge_method'? (valid keys: merge_method, models, "
     "slices, base_model, dtype, out_dtype, parameters, tokenizer_source, tokenizer, chat_template, modules)"),
    (SCE.replace("smooth: true", "selct_topk: 0.2"), SCE.replace("  smooth: true\n", ""),
     "mk.yml:9: parameters.selct_topk", "unknown parameter 'selct_topk' for merge method 'sce'; did you mean "
     "'select_topk'? (sce takes only int8_mask, select_topk)"),
])
def test_strict_by_default_lenient_as_mergekit(models, tmp_path, text, clean, where, message):
    """The default refuses the key in one line saying where it belongs (a typo gets a "did you mean"); with
    --mergekit-lenient the same line is a warning and the output is the config's without the key, which is
    what mergekit reads."""
    path = write_config(tmp_path, "mk", text, models)
    r = run_cli("run", path, "-o", tmp_path / "out", "-q")
    assert r.returncode == 1 and not (tmp_path / "out").exists()
    assert r.stderr.replace(str(path), "mk.yml") == f"error: {where}: {message}{LENIENT_TAIL}\n"
    for command in (["validate"], ["plan"], ["run", "-o", tmp_path / "out", "-q"]):
        with warnings.catch_warnings():
            warnings.simplefilter("always", UserWarning)  # each command warns, as each process would
            r = run_cli(*command[:1], path, *command[1:], "--mergekit-lenient")
        assert r.returncode == 0, r.stderr
        lines = [line for line in r.stderr.replace(str(path), "mk.yml").splitlines() if "[transformers]" not in line]
        assert lines == [f"warning: {where}: {message}{IGNORED_TAIL}"], (command, r.stderr)
    # mergekit reads the config without the key (tests/mergekit/test_mergekit_corpus.py compares with mergekit-yaml)
    r = run_cli("run", write_config(tmp_path, "clean", clean, models), "-o", tmp_path / "clean", "-q")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    ours, plain = load(tmp_path / "out"), load(tmp_path / "clean")
    assert sorted(ours) == sorted(plain) and all(raw_bytes(ours[n]) == raw_bytes(plain[n]) for n in ours)


def test_python_api_takes_mergekit_lenient(models, tmp_path):
    from surgery import SurgeryError, build_plan, run

    path = write_config(tmp_path, "mk", SCE, models)
    with pytest.raises(SurgeryError, match="unknown parameter 'smooth'"):
        build_plan(path)
    plan, messages = captured(build_plan, path, mergekit_lenient=True)
    assert any("parameters.smooth" in m for m in messages) and "smooth" not in plan.format(tensors=True)
    result, _ = captured(run, path, tmp_path / "out", mergekit_lenient=True)
    assert "model.embed_tokens.weight" in load(result.output)


def test_multi_stage_config_takes_mergekit_lenient(models, tmp_path):
    """A multi-stage file (mergekit-multi): each stage is translated with the same leniency."""
    from surgery import SurgeryError, run
    from test_mergekit_config import MULTI

    path = write_config(tmp_path, "multi", MULTI.replace("merge_method: linear\n---", "merge_method: linear\n"
                                                         "pad_to_multiple_of: 8\n---"), models)
    with pytest.raises(SurgeryError) as e:
        run(path, tmp_path / "strict")
    assert str(e.value) == (f"{path}:9: pad_to_multiple_of: unknown key 'pad_to_multiple_of' in a mergekit config: it "
                            f"belongs in tokenizer.pad_to_multiple_of{LENIENT_TAIL}")
    assert not (tmp_path / "strict").exists()
    _, messages = captured(run, path, tmp_path / "lenient", mergekit_lenient=True)
    assert [m for m in messages if "pad_to_multiple_of" in m] == [
        f"{path}:9: pad_to_multiple_of: unknown key 'pad_to_multiple_of' in a mergekit config: it belongs in "
        f"tokenizer.pad_to_multiple_of{IGNORED_TAIL}"]
    run(write_config(tmp_path, "plain", MULTI, models), tmp_path / "plain")
    ours, plain = load(tmp_path / "lenient"), load(tmp_path / "plain")
    assert sorted(ours) == sorted(plain) and all(raw_bytes(ours[n]) == raw_bytes(plain[n]) for n in ours)
