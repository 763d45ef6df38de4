"""The bad-input corpus, recipes and what they name: YAML tags, bombs and nesting, bad regexes, adapter configs,
non-finite numbers, mergekit configs and pickles. Each case asserts the exact one-line message, the exit code,
and that nothing changed (bad_input_kit.check).
"""

from __future__ import annotations

import pytest
from bad_input_kit import (AD, BOMB, MK, PRE, RECIPE, RECIPE_AD, RECIPE_RUN, ST, Evil, adapter_config, both, check,
                           loop, make_pickle, nan_input, raw_header, recipe)

CASES = [
    # ---- recipes
    ("yaml-python-tag", recipe("inputs: !!python/object/apply:os.system ['echo hi']\n"), ["validate", "recipe.yaml"],
     "recipe.yaml:1: unsupported YAML tag '!!python/object/apply:os.system'; recipes are plain YAML"),
    ("yaml-python-name", recipe("inputs:\n  a: !!python/name:os.system good\n"), ["validate", "recipe.yaml"],
     "recipe.yaml:2: unsupported YAML tag '!!python/name:os.system'; recipes are plain YAML"),
    ("yaml-custom-tag", recipe("inputs:\n  a: !model good\n"), ["validate", "recipe.yaml"],
     "recipe.yaml:2: unsupported YAML tag '!model'; recipes are plain YAML"),
    ("yaml-tag-on-key", recipe("inputs:\n  !!python/str a: good\n"), ["validate", "recipe.yaml"],
     "recipe.yaml:2: unsupported YAML tag '!!python/str'; recipes are plain YAML"),
    ("yaml-alias-bomb", recipe(BOMB), ["validate", "recipe.yaml"],
     "recipe.yaml:1: YAML aliases expand to more than 100000 nodes; refused (an alias bomb?)"),
    ("yaml-deep-nesting", recipe("a: " + "[" * 60 + "]" * 60 + "\n"), ["validate", "recipe.yaml"],
     "recipe.yaml:1: YAML nested deeper than 50 levels"),
    ("yaml-very-deep-nesting", recipe("a: " + "[" * 5000 + "]" * 5000 + "\n"), ["validate", "recipe.yaml"],
     "recipe.yaml: YAML nested deeper than 50 levels"),
    ("yaml-complex-key", recipe("? [a, b]\n: 1\n"), ["validate", "recipe.yaml"],
     "recipe.yaml:1: a mapping key must be a plain value, not a list or mapping"),
    ("yaml-control-char", recipe("inputs: {a: good}\x07\n"), ["validate", "recipe.yaml"],
     "recipe.yaml: invalid YAML: unacceptable character #x0007: special characters are not allowed"),
    ("regex-names", recipe(RECIPE.replace("bad", "good2") + "operations:\n  - arithmetic:\n      expr: base - x\n"
                           "      select: {names: ['re:[']}\n"), ["validate", "recipe.yaml"],
     "recipe.yaml:8: operations.0.arithmetic.select.names: invalid regex '[': unterminated character set at "
     "position 0 (got ['re:['])"),
    ("regex-exclude", recipe(RECIPE.replace("bad", "good2") + "operations:\n  - arithmetic:\n      expr: base - x\n"
                             "      select: {exclude: ['*.mlp.*', 're:(a']}\n"), ["validate", "recipe.yaml"],
     "recipe.yaml:8: operations.0.arithmetic.select.exclude: invalid regex '(a': missing ), unterminated subpattern "
     "at position 0 (got ['*.mlp.*', 're:(a'])"),
    # ---- adapters (as recipe inputs; adamergex below)
    ("adapter-config-list", adapter_config(lambda c: [c]), ["validate", "recipe.yaml"],
     AD + "a JSON list, not an object"),
    ("adapter-r-string", adapter_config(lambda c: c.update(r="two")), ["validate", "recipe.yaml"],
     AD + "r: expected a positive integer, got 'two'"),
    ("adapter-r-zero", adapter_config(lambda c: c.update(r=0)), ["validate", "recipe.yaml"],
     AD + "r: expected a positive integer, got 0"),
    ("adapter-r-bool", adapter_config(lambda c: c.update(r=True)), ["validate", "recipe.yaml"],
     AD + "r: expected a positive integer, got True"),
    ("adapter-alpha-string", adapter_config(lambda c: c.update(lora_alpha="x")), ["validate", "recipe.yaml"],
     AD + "lora_alpha: expected a number, got 'x'"),
    ("adapter-rank-pattern-list", adapter_config(lambda c: c.update(rank_pattern=[1])), ["validate", "recipe.yaml"],
     AD + "rank_pattern: expected a mapping of module pattern to a positive integer, got [1]"),
    ("adapter-rank-pattern-value", adapter_config(lambda c: c.update(rank_pattern={"q_proj": "x"})),
     ["validate", "recipe.yaml"], AD + "rank_pattern: expected a mapping of module pattern to a positive integer, "
                                       "got {{'q_proj': 'x'}}"),
    ("adapter-rank-pattern-regex", adapter_config(lambda c: c.update(rank_pattern={"[": 2})),
     ["validate", "recipe.yaml"], AD + "rank_pattern: invalid regex '[': unterminated character set at position 0"),
    ("adapter-alpha-pattern-regex", adapter_config(lambda c: c.update(alpha_pattern={"(q": 2})),
     ["validate", "recipe.yaml"], AD + "alpha_pattern: invalid regex '(q': missing ), unterminated subpattern at "
                                       "position 0"),
    ("adapter-target-regex", adapter_config(lambda c: c.update(target_modules="*proj")),
     ["validate", "recipe.yaml"], AD + "target_modules: invalid regex '*proj': nothing to repeat at position 0"),
    ("adapter-target-number", adapter_config(lambda c: c.update(target_modules=5)), ["validate", "recipe.yaml"],
     AD + "target_modules: expected a list of module names or a regex string, got 5"),
    ("adapter-fifo-string", adapter_config(lambda c: c.update(fan_in_fan_out="yes")), ["validate", "recipe.yaml"],
     AD + "fan_in_fan_out: expected true or false, got 'yes'"),
    ("adapter-layers-string", adapter_config(lambda c: c.update(layers_to_transform="0")), ["validate", "recipe.yaml"],
     AD + "layers_to_transform: expected an integer or a list of integers, got '0'"),
    ("adapter-config-not-json", adapter_config(lambda c: b"{"), ["validate", "recipe.yaml"],
     AD + "invalid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("adapter-config-not-utf8", adapter_config(lambda c: b'{"r": "\xff"}'), ["validate", "recipe.yaml"],
     AD + "invalid JSON: 'utf-8' codec can't decode byte 0xff in position 7: invalid start byte"),
    ("adapter-symlink-loop", both(recipe(RECIPE_AD.replace("adapter: lora", "adapter: ad")), loop("ad")),
     ["validate", "recipe.yaml"], "recipe.yaml:3: inputs.ad: ad: symlink loop at {w}/ad"),
    ("adamergex-config-list", adapter_config(lambda c: [c]), ["adamergex", "lora", "lora", "lora", "-o", "out"],
     "lora/adapter_config.json: a JSON list, not an object"),
    ("adamergex-r-string", adapter_config(lambda c: c.update(r="two")), ["adamergex", "lora", "lora", "lora", "-o", "o"],
     "lora/adapter_config.json: r: expected a positive integer, got 'two'"),
    # ---- numbers
    ("nan-input-run", both(recipe(RECIPE_RUN), nan_input(float("nan"))), ["run", "recipe.yaml", "-o", "new/deeper/out"],
     "tensor 'model.embed_tokens.weight': 1 non-finite values (NaN/Inf) in the output; the inputs hold them: "
     "1 in bad:model.embed_tokens.weight; pass --allow-nonfinite to write them anyway"),
    ("inf-input-run", both(recipe(RECIPE_RUN), nan_input(float("inf"))), ["run", "recipe.yaml", "-o", "new/out"],
     "tensor 'model.embed_tokens.weight': 1 non-finite values (NaN/Inf) in the output; the inputs hold them: "
     "1 in bad:model.embed_tokens.weight; pass --allow-nonfinite to write them anyway"),
    ("float16-overflow-run", recipe(RECIPE.replace("bad", "good2") + "output: {dtype: float16}\noperations:\n"
                                    "  - arithmetic: {expr: 'base * 1e9', select: {names: ['lm_head.weight']}}\n"),
     ["run", "recipe.yaml", "-o", "new/out"], "tensor 'lm_head.weight': {n16} values exceed the F16 range (|x| > 65504) "
                                              "and would be written as Inf; use a wider output dtype, or pass "
                                              "--allow-nonfinite to write them anyway"),
    ("nan-extract-lora", nan_input(float("nan"), "model.layers.0.self_attn.q_proj.weight"),
     ["extract-lora", "good", "bad", "-o", "new/lora", "--rank", "2"],
     "bad: tensor 'model.layers.0.self_attn.q_proj.weight' holds 1 non-finite values (NaN/Inf); a LoRA cannot be "
     "extracted from it"),
    ("nan-diff-expert", nan_input(float("nan"), "model.layers.0.mlp.up_proj.weight"), ["diff", "good", "bad"],
     "bad: tensor 'model.layers.0.mlp.up_proj.weight' holds 1 non-finite values (NaN/Inf); statistics over it "
     "would be meaningless"),
    ("inf-diff-base", nan_input(float("-inf"), "model.norm.weight"), ["diff", "bad", "good"],
     "bad: tensor 'model.norm.weight' holds 1 non-finite values (NaN/Inf); statistics over it would be meaningless"),
    # ---- mergekit
    ("mergekit-pickle", both(recipe(MK, "mk.yml"), lambda w: make_pickle(w, {})),
     ["mergekit", "mk.yml", "out", "--no-copy-tokenizer"],
     "mk.yml: model 'bad': only pickle .bin weights found; `surgery mergekit` never loads pickles (they can run "
     "code): run the config with `surgery run CONFIG -o OUT --convert-bin`, or convert the model to safetensors first"),
    ("mergekit-no-tokenizer", recipe("base_model: good\n" + MK.replace("bad", "good2"), "mk.yml"),
     ["mergekit", "mk.yml", "out"],
     "mk.yml: model 'good' has no tokenizer files to copy; add them, or pass --no-copy-tokenizer"),
    ("mergekit-bad-header", both(recipe(MK, "mk.yml"), raw_header(b"[]")),
     ["mergekit", "mk.yml", "out", "--no-copy-tokenizer"],
     "mk.yml: model 'bad': {w}/bad/model.safetensors: invalid safetensors header: a JSON list, not an object"),
    ("mergekit-python-tag", recipe("merge_method: !!python/object/apply:os.system ['echo hi']\n", "mk.yml"),
     ["mergekit", "mk.yml", "out"], "mk.yml:1: unsupported YAML tag '!!python/object/apply:os.system'; recipes are "
                                    "plain YAML"),
    ("mergekit-config-loop", loop("mk.yml"), ["mergekit", "mk.yml", "out"], "mk.yml: symlink loop at mk.yml"),
    # ---- messages
    ("convert-bin-evil-pickle", both(recipe(RECIPE), lambda w: make_pickle(w, {"w": Evil()})),
     ["validate", "recipe.yaml", "--convert-bin"],
     PRE + "{w}/bad/pytorch_model.bin: cannot load with weights_only=True: not a file the safe loader can read "
           "(Unsupported operand 149)"),
    ("convert-bin-evil-torch-save", both(recipe(RECIPE), lambda w: make_pickle(w, {"w": Evil()}, torch_save=True)),
     ["validate", "recipe.yaml", "--convert-bin"],
     PRE + "{w}/bad/pytorch_model.bin: cannot load with weights_only=True: it holds objects other than tensors "
           "(posix.getcwd); refused: unpickling them could run code"),
    ("convert-bin-raw-pickle", both(recipe(RECIPE), lambda w: make_pickle(w, [1, 2])),
     ["validate", "recipe.yaml", "--convert-bin"],
     PRE + "{w}/bad/pytorch_model.bin: cannot load with weights_only=True: not a file the safe loader can read "
           "(Unsupported operand 149)"),
    ("convert-bin-not-a-dict", both(recipe(RECIPE), lambda w: make_pickle(w, [1, 2], torch_save=True)),
     ["validate", "recipe.yaml", "--convert-bin"], PRE + "{w}/bad/pytorch_model.bin: not a state dict (a pickled list)"),
    ("pickle-without-flag", both(recipe(RECIPE), lambda w: make_pickle(w, {})), ["validate", "recipe.yaml"],
     PRE + "bad: only pickle .bin weights found (pytorch_model.bin). Pickle files can run code when loaded, so they "
           "are refused. Pass --convert-bin to convert them once with torch.load(weights_only=True) into safetensors."),
]




@pytest.mark.parametrize("name,setup,args,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(work, name, setup, args, message):
    setup(work)
    n16 = None
    if "{n16}" in message:  # the float16 overflow case's count, computed here in float32 as the run does
        from safetensors.torch import load_file

        n16 = int(((load_file(str(work / "good" / ST))["lm_head.weight"].float() * 1e9).abs() > 65504).sum())
    check(work, args, message.format(w=work, n16=n16))
