"""The bad-input corpus, paths and outputs: symlink loops, oversized or non-UTF-8 recipes, configs that are not
JSON objects, and every way an output could replace or land inside an input. Each case asserts the exact one-line
message, the exit code, and that nothing changed (bad_input_kit.check).
"""

from __future__ import annotations

import os
import shutil

import pytest
from bad_input_kit import MK, OUT_REFUSED, PRE, RECIPE, both, check, loop, recipe
from corpus import copy_ckpt


CASES = [
    # ---- file system
    ("input-symlink-loop", both(recipe(RECIPE), loop("bad")), ["validate", "recipe.yaml"],
     PRE + "bad: symlink loop at {w}/bad"),
    ("input-dangling-link", both(recipe(RECIPE), lambda w: os.symlink("nowhere", w / "bad")), ["validate", "recipe.yaml"],
     PRE + "bad: {w}/bad is a broken symlink (its target does not exist)"),
    ("recipe-symlink-loop", loop("r.yaml"), ["validate", "r.yaml"], "r.yaml: symlink loop at r.yaml"),
    ("recipe-not-utf8", recipe(b"inputs: {a: \xff}\n"), ["validate", "recipe.yaml"],
     "recipe.yaml: not UTF-8 text (byte 0xff at offset 12)"),
    ("recipe-too-large", recipe("# " + "x" * (5 << 20) + "\n"), ["validate", "recipe.yaml"],
     "recipe.yaml: 5242883 bytes; larger than the 4194304-byte limit"),
    ("output-under-a-file", both(recipe(RECIPE.replace("bad", "good2")), lambda w: (w / "afile").write_text("x")),
     ["run", "recipe.yaml", "-o", "afile/out"], "{w}/afile/out: cannot create the output: {w}/afile is a file, not a folder"),
    ("output-symlink-loop", both(recipe(RECIPE.replace("bad", "good2")), loop("o")), ["run", "recipe.yaml", "-o", "o"],
     "{w}/o: symlink loop at {w}/o"),
    ("config-not-json", both(recipe(RECIPE.replace("base: good", "base: bad")), lambda w: copy_ckpt(w / "good", w / "bad"),
                             lambda w: (w / "bad" / "config.json").write_text("{")),
     ["validate", "recipe.yaml"], "{w}/bad/config.json: not a valid config (Expecting property name enclosed in double "
                                  "quotes: line 1 column 2 (char 1))"),
    ("config-list", both(recipe(RECIPE.replace("base: good", "base: bad")), lambda w: copy_ckpt(w / "good", w / "bad"),
                         lambda w: (w / "bad" / "config.json").write_text("[]")),
     ["validate", "recipe.yaml"], "{w}/bad/config.json: not a valid config (a JSON list, not an object)"),
    # ---- output safety
    ("output-is-input", recipe(RECIPE.replace("bad", "good2")), ["run", "recipe.yaml", "-o", "good"], OUT_REFUSED),
    ("output-is-input-force", recipe(RECIPE.replace("bad", "good2")), ["run", "recipe.yaml", "-o", "good", "--force"],
     OUT_REFUSED),
    ("output-inside-input", recipe(RECIPE.replace("bad", "good2")), ["run", "recipe.yaml", "-o", "good/sub", "--force"],
     "{w}/good/sub: the output is inside the input {w}/good; choose a folder outside it"),
    ("output-dot-force", recipe(RECIPE.replace("bad", "good2")), ["run", "recipe.yaml", "-o", ".", "--force"],
     "{w}: the output would replace the input {w}/recipe.yaml; choose another output folder"),
    ("output-contains-input", both(recipe(RECIPE.replace("good2", "sub/good2").replace("bad", "sub/good2")),
                                   lambda w: shutil.move(w / "good2", w / "sub" / "good2") if (w / "sub").mkdir() is None
                                   else None),
     ["run", "recipe.yaml", "-o", "sub", "--force"],
     "{w}/sub: the output would replace the input {w}/sub/good2; choose another output folder"),
    ("force-arbitrary-dir", both(recipe(RECIPE.replace("bad", "good2")),
                                 lambda w: (w / "stuff").mkdir() or (w / "stuff" / "notes.txt").write_text("mine")),
     ["run", "recipe.yaml", "-o", "stuff", "--force"],
     "{w}/stuff: --force replaces only a previous surgery output, and this directory is not one (no "
     "surgery_manifest.json or .surgery-output); remove it yourself or choose another"),
    ("existing-no-force", both(recipe(RECIPE.replace("bad", "good2")), lambda w: (w / "stuff").mkdir()),
     ["run", "recipe.yaml", "-o", "stuff"], "output directory {w}/stuff already exists; pass --force to replace it"),
    ("extract-over-base", lambda w: None, ["extract-lora", "good", "good2", "-o", "good", "--force", "--rank", "2"],
     OUT_REFUSED),
    ("extract-inside-tuned", lambda w: None, ["extract-lora", "good", "good2", "-o", "good2/lora", "--rank", "2"],
     "{w}/good2/lora: the output is inside the input {w}/good2; choose a folder outside it"),
    ("adamergex-over-task", lambda w: None, ["adamergex", "lora", "lora", "lora", "-o", "lora", "--force"],
     "{w}/lora: the output would replace the input {w}/lora; choose another output folder"),
    ("mergekit-over-model", recipe(MK.replace("bad", "good2"), "mk.yml"),
     ["mergekit", "mk.yml", "good", "--force", "--no-copy-tokenizer"],
     "{w}/good: the output would replace the input {w}/good; choose another output folder"),
    ("mergekit-dot", recipe(MK.replace("bad", "good2"), "mk.yml"), ["mergekit", "mk.yml", ".", "--force"],
     "{w}: the output would replace the input {w}/good; choose another output folder"),
    ("demo-over-a-folder", lambda w: None, ["demo", "--dir", "good"],
     "{w}/good: already exists and is not a previous demo folder; choose another --dir"),
]


@pytest.mark.parametrize("name,setup,args,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(work, name, setup, args, message):
    setup(work)
    check(work, args, message.format(w=work))
