"""The commented example recipes in recipes/ validate and run on the demo checkpoints."""

import shutil
from pathlib import Path

import pytest
import torch
from helpers import load

import surgery

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def examples(demo_dir, tmp_path_factory):
    """recipes/ copied into a folder of their own, with a link to the demo checkpoints where their relative
    paths point (../demo/checkpoints); the shared demo fixture is not written to."""
    root = tmp_path_factory.mktemp("examples")
    shutil.copytree(ROOT / "recipes", root / "recipes")
    (root / "demo").mkdir()
    (root / "demo" / "checkpoints").symlink_to(demo_dir / "checkpoints")
    return root / "recipes"


def test_examples_exist():
    assert {"layer_swap.yaml", "adamergex.yaml", "task_arithmetic.yaml"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(examples, tmp_path, name):
    recipe = surgery.load_recipe(examples / name)
    result = surgery.run(recipe, tmp_path / "out")
    assert len(result.plan.entries) == 75
    assert (tmp_path / "out" / "surgery_manifest.json").exists()


def test_adamergex_example_formula(examples, tmp_path):
    surgery.run(examples / "adamergex.yaml", tmp_path / "out")
    got = load(tmp_path / "out")
    ck = examples.parent / "demo" / "checkpoints"
    math, sw, en = load(ck / "math"), load(ck / "swahili"), load(ck / "english")
    n = "model.layers.6.mlp.up_proj.weight"
    want = (math[n].float() * 1.0).add_(sw[n].float()).add_(en[n].float(), alpha=-1.0)
    assert torch.equal(got[n], want.to(torch.bfloat16))
    assert torch.equal(got["model.embed_tokens.weight"], math["model.embed_tokens.weight"])
