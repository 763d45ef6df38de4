"""mergekit configs through `surgery run`: translation, strictness, tokenizer_source, layer_types."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import load, raw_bytes, run_cli
from mergekit_kit import make_models, run_mergekit, write_config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("mkc_models"))


def config_error(tmp_path, models, text) -> str:
    from surgery import SurgeryError, build_plan, load_recipe

    path = write_config(tmp_path, "mk", text, models)
    with pytest.raises(SurgeryError) as e:
        build_plan(load_recipe(path))
    return str(e.value).replace(str(path), "mk.yml")


TIES = """
models:
  - model: {a}
    parameters: {{weight: 0.5, density: 0.5}}
merge_method: ties
base_model: {base}
"""


@pytest.mark.parametrize("text, message", [
    (TIES + "paramters: {{normalize: true}}\n",
     "mk.yml:7: paramters: unknown key 'paramters' in a mergekit config; did you mean 'parameters'?"),
    (TIES.replace("density: 0.5", "densty: 0.5"),
     "mk.yml:4: models.0.parameters.densty: unknown parameter 'densty' for merge method 'ties'; did you mean 'density'?"),
    (TIES + "parameters: {{lamda: 0.5}}\n",
     "mk.yml:7: parameters.lamda: unknown parameter 'lamda' for merge method 'ties'; did you mean 'lambda'?"),
    (TIES.replace("merge_method: ties", "merge_method: tise"),
     "mk.yml:5: merge_method: unknown merge method 'tise'; did you mean 'ties'?"),
    (TIES.replace("- model: {a}", "- modle: {a}"), "models.0.modle: unknown key 'modle' in a model entry; did you mean 'model'?"),
    (TIES + "dtype: bf16\n", "mk.yml:7: dtype: unknown dtype 'bf16'"),
    (TIES + "tokenizer_source: union\n", "mk.yml:6: base_model: the tokenizer section needs every model's tokenizer, and 'base' has no tokenizer files"),
    (TIES + "tokenizer_source: somewhere/else\n", "tokenizer_source 'somewhere/else' is not one of the config's models"),
    (TIES + "chat_template: chatm\n", "mk.yml:7: chat_template: unknown chat template 'chatm'; did you mean 'chatml'?"),
    (TIES + "tokenizer: {{source: union}}\ntokenizer_source: base\n", "give either 'tokenizer' or 'tokenizer_source'"),
    (TIES + "tokenizer: {{source: union, tokns: {{}}}}\n", "mk.yml:7: tokenizer.tokns: unknown key 'tokns' in the tokenizer section; did you mean 'tokens'?"),
    (TIES.replace("- model: {a}", "- model: {a}+{a}+x"), "a model reference is 'model' or 'model+lora'"),
    ("merge_method: linear\nmodels:\n  - parameters: {{weight: 1}}\n", "mk.yml:3: models.0.model: missing required key 'model'"),
    ("merge_method: linear\nmodels:\n  - model: ./nope\n    parameters: {{weight: 1}}\n",
     "mk.yml:3: models.0.model: checkpoint not found: './nope'"),
    ("base_model: {base}\ngate_mode: hidden\nexperts:\n  - source_model: {a}\n    positive_prompts: [x]\n",
     "mk.yml:3: experts: this is a mergekit-moe config"),
    (TIES + "modules:\n  vision_tower: {{models: [{{model: {a}}}]}}\n", "per-module configs for multimodal models (module 'vision_tower') are not supported"),
    ("merge_method: linear\n", "exactly one of 'models', 'slices' or 'modules' must be present"),
    ("models:\n  - model: {a}\n", "missing required key 'merge_method'"),
    ("""
    slices:
      - sources:
          - model: {a}
            layer_rnage: [0, 4]
    merge_method: passthrough
    """, "slices.0.sources.0.layer_rnage: unknown key 'layer_rnage' in a slice source; did you mean 'layer_range'?"),
    ("""
    slices:
      - sources:
          - {{model: {a}, layer_range: [0, 4]}}
          - {{model: {b}, layer_range: [0, 3]}}
    merge_method: slerp
    base_model: {a}
    parameters: {{t: 0.5}}
    """, "all sources of a slice must have the same number of layers (4 and 3)"),
    ("""
    slices:
      - sources:
          - {{model: {a}, layer_range: [0, 8]}}
    merge_method: ties
    base_model: {base}
    """, "is not among this slice's sources (merge method 'ties' uses a base)"),
    ("""
    slices:
      - sources:
          - {{model: {a}, layer_range: [4, 2]}}
    merge_method: passthrough
    """, "layer_range is [start, end) with 0 <= start < end (got [4, 2])"),
    ("""
    slices:
      - sources:
          - {{model: {a}, layer_range: [0, 12]}}
    merge_method: passthrough
    """, "mk.yml:4: slices.0.sources.0.layer_range: layer 8 is out of range: the model has 8 layers (0-7)"),
    ("""
    models:
      - model: {a}
      - model: {b}
    merge_method: linear
    """, "merge method 'linear' needs parameter 'weight' for every model"),
    ("""
    models:
      - model: {a}
        parameters: {{weight: 1}}
      - model: {a}
        parameters: {{weight: 1}}
    merge_method: linear
    """, "is listed twice"),
])
def test_bad_mergekit_configs(tmp_path, models, text, message):
    assert message in config_error(tmp_path, models, text)


def test_models_config_translation(tmp_path, models):
    from surgery import build_plan, load_recipe

    path = write_config(tmp_path, "mk", TIES, models)
    recipe = load_recipe(path)
    assert recipe.recipient == "base"
    assert sorted(recipe.inputs) == ["a", "base"]
    (op,) = recipe.operations
    assert op.method == "ties" and op.base == "base" and op.models == {"a": {"weight": 0.5, "density": 0.5}}
    text = build_plan(recipe).format()
    assert "ties: a(weight=0.5, density=0.5) + base [base]" in text


def test_slices_translate_to_a_stack(tmp_path, models):
    from surgery import build_plan, load_recipe

    path = write_config(tmp_path, "mk", """
    slices:
      - sources:
          - {{model: {a}, layer_range: [0, 6]}}
      - sources:
          - {{model: {b}, layer_range: [2, 8]}}
    merge_method: passthrough
    """, models)
    plan = build_plan(load_recipe(path))
    assert plan.layer_map == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    assert plan.layer_from == ["a"] * 6 + ["b"] * 6


@pytest.mark.slow
def test_tokenizer_source_copies_that_models_tokenizer(tmp_path, models):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from surgery import run

    for i, name in enumerate(("base", "a", "b")):
        vocab = {"[UNK]": 0, **{f"w{j}": j for j in range(1, 128)}}
        tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", model_max_length=100 + i).save_pretrained(
            tmp_path / f"tok_{name}")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        for name in ("base", "a", "b"):
            (models[name] / f).write_bytes((tmp_path / f"tok_{name}" / f).read_bytes())
    config = write_config(tmp_path, "mk", """
    models:
      - model: {a}
        parameters: {{weight: 0.5}}
      - model: {b}
        parameters: {{weight: 0.5}}
    merge_method: task_arithmetic
    base_model: {base}
    tokenizer_source: {a}
    """, models)
    run_mergekit([(config, tmp_path / "mk_out", [])])
    run(config, tmp_path / "ours")
    for out in ("mk_out", "ours"):
        assert json.loads((tmp_path / out / "tokenizer_config.json").read_text())["model_max_length"] == 101
    mk, ours = load(tmp_path / "mk_out"), load(tmp_path / "ours")
    assert sorted(mk) == sorted(ours) and all(torch.equal(mk[n], ours[n]) for n in mk)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        for name in ("base", "a", "b"):
            (models[name] / f).unlink()


def test_passthrough_slicing_with_layer_types(tmp_path):
    """mergekit 0.1.5 crashes here under transformers 5; surgery writes a config that loads."""
    from transformers import AutoModelForCausalLM

    from surgery import run

    qwen = make_models(tmp_path / "qwen", arch="qwen2")
    cfg = json.loads((qwen["a"] / "config.json").read_text())
    cfg["layer_types"] = ["sliding_attention" if i % 2 else "full_attention" for i in range(8)]
    cfg["use_sliding_window"], cfg["max_window_layers"], cfg["sliding_window"] = True, 0, 4
    (qwen["a"] / "config.json").write_text(json.dumps(cfg))
    config = write_config(tmp_path, "frank", """
    slices:
      - sources:
          - {{model: {a}, layer_range: [0, 6]}}
      - sources:
          - {{model: {b}, layer_range: [3, 8]}}
    merge_method: passthrough
    base_model: {a}
    """, qwen)
    run(config, tmp_path / "out")
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["num_hidden_layers"] == 11
    assert out_cfg["layer_types"] == [cfg["layer_types"][i] for i in [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]]
    out = load(tmp_path / "out")
    b = load(qwen["b"])
    assert raw_bytes(out["model.layers.6.mlp.up_proj.weight"]) == raw_bytes(b["model.layers.3.mlp.up_proj.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 11
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_surgery_run_cli_accepts_mergekit_config(tmp_path, models):

    path = write_config(tmp_path, "mk", TIES + "paramters: {{normalize: true}}\n", models)
    r = run_cli("run", path, "-o", tmp_path / "o")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: {path}:7: paramters: unknown key 'paramters' in a mergekit config; did you mean 'parameters'? "
        "(valid keys: merge_method, models, slices, base_model, dtype, out_dtype, parameters, tokenizer_source, "
        "tokenizer, chat_template, modules); mergekit ignores it where it stands (--mergekit-lenient ignores it too, "
        "with a warning)"]
    assert not (tmp_path / "o").exists()


def test_module_docstring_example_is_valid():
    from surgery.mergekit.config import is_mergekit_config, translate

    data = {"models": [{"model": "x/a", "parameters": {"weight": 1}}], "merge_method": "linear"}
    assert is_mergekit_config(data)
    recipe, _ = translate(data)
    assert recipe["inputs"] == {"a": "x/a"} and recipe["recipient"] == "a"
    assert not is_mergekit_config({"inputs": {"a": "x"}, "operations": []})


MULTI = """
name: first
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
merge_method: linear
---
models:
  - model: first
    parameters: {{weight: 0.3}}
  - model: {c}
    parameters: {{weight: 0.7}}
merge_method: linear
"""


def test_multi_stage_out_path_format_equals_named_stages(tmp_path, models):
    """mergekit's examples/mega.yml names stages by out_path; mergekit-multi by name: the same merge."""
    from surgery import run

    named = write_config(tmp_path, "named", MULTI, models)
    mega = write_config(tmp_path, "mega", MULTI.replace("name: first", "out_path: ./models/first")
                        .replace("model: first", "model: ./models/first"), models)
    run(named, tmp_path / "named_out")
    run(mega, tmp_path / "mega_out")
    a, b = load(tmp_path / "named_out"), load(tmp_path / "mega_out")
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
    # the result is the linear merge of the linear merge, stage by stage in bf16 as mergekit-multi writes it
    ma, mb, mc = load(models["a"]), load(models["b"]), load(models["c"])
    name = "model.layers.3.mlp.up_proj.weight"
    first = (0.5 * ma[name].float() + 0.5 * mb[name].float()).to(torch.bfloat16)
    assert torch.equal(a[name], (0.3 * first.float() + 0.7 * mc[name].float()).to(torch.bfloat16))
    assert not list(tmp_path.glob(".named_out.stages-*"))  # the intermediate folders are gone


@pytest.mark.parametrize("text, message", [
    (MULTI.replace("model: {b}", "model: second") + "---\n" + MULTI.split("---")[1]
     + "name: second\n", "the stages use each other in a cycle: first -> second -> first"),
    (MULTI.replace("---\n", "---\nname: first\n"), "mk.yml:10: stage 'first' is defined twice (first on line 2)"),
    (MULTI + "---\n" + MULTI.split("---")[1], "an unnamed stage (the output) is defined twice"),
])
def test_bad_multi_stage_configs(tmp_path, models, text, message):
    from surgery import SurgeryError, run

    path = write_config(tmp_path, "mk", text, models)
    with pytest.raises(SurgeryError) as e:
        run(path, tmp_path / "out")
    assert message in str(e.value).replace(str(path), "mk.yml")
    assert not (tmp_path / "out").exists()


def test_plan_of_a_multi_stage_config_says_why_not(tmp_path, models):
    from surgery import SurgeryError, build_plan

    path = write_config(tmp_path, "mk", MULTI, models)
    with pytest.raises(SurgeryError, match="a multi-stage mergekit config"):
        build_plan(path)


def test_dtype_without_out_dtype_keeps_what_the_method_returns(tmp_path, models):
    """mergekit's rule: `dtype` converts the inputs, `out_dtype` the outputs; arcee_fusion returns float32."""
    from surgery import build_plan, load_recipe

    text = "models:\n  - model: {a}\n  - model: {b}\nmerge_method: arcee_fusion\nbase_model: {a}\ndtype: bfloat16\n"
    recipe = load_recipe(write_config(tmp_path, "mk", text, models))
    assert (recipe.output.dtype, recipe.output.config_dtype) == (None, "bfloat16")
    assert {e.dtype for e in build_plan(recipe).entries} == {"F32"}
    recipe = load_recipe(write_config(tmp_path, "mk2", text + "out_dtype: float16\n", models))
    assert (recipe.output.dtype, recipe.output.config_dtype) == ("float16", "float16")
    assert {e.dtype for e in build_plan(recipe).entries} == {"F16"}


def test_top_level_parameters_and_stage_keys_are_ignored_with_a_warning(tmp_path, models):
    from surgery import load_recipe

    path = write_config(tmp_path, "mk", TIES + "int8_mask: true\nout_path: ./merged\n", models)
    with pytest.warns(UserWarning) as caught:
        recipe = load_recipe(path)
    messages = [str(w.message).replace(str(path), "mk.yml") for w in caught]
    assert "mk.yml:7: int8_mask: top-level 'int8_mask' is ignored, as mergekit ignores it (mergekit reads " \
           "int8_mask only under 'parameters')" in messages
    assert any(m.startswith("mk.yml:8: out_path: top-level 'out_path' is ignored") for m in messages)
    assert recipe.operations[0].parameters == {}


def test_recipe_tokenizer_needs_merged_vocabulary_tensors(tmp_path, models):
    """A native recipe with a tokenizer: a vocabulary tensor that no merge re-indexes is refused."""
    from surgery import SurgeryError, build_plan, load_recipe

    recipe = load_recipe({"inputs": {"base": str(models["base"]), "a": str(models["a"])}, "recipient": "base",
                          "tokenizer": {"source": "base"},
                          "operations": [{"merge": {"method": "linear", "models": {"a": {"weight": 1.0}},
                                                    "select": {"layers": "0-7"}}}]})
    with pytest.raises(SurgeryError, match="'model.embed_tokens.weight' is set by recipient"):
        build_plan(recipe)
