"""Start-up of `surgery run`: a copy-only plan imports and builds only what it uses (no timings: module and
model lists, which do not depend on the machine's load)."""

import json
from pathlib import Path

import pytest
from helpers import probe


def heavy(modules: list[str]) -> list[str]:
    """Modules a quiet copy-only run has no use for: tensor libraries, progress bars, the Hub client and card code, the
    adapter machinery, and the subpackages of other commands."""
    roots = ("torch", "numpy", "safetensors", "transformers", "mergekit", "peft", "huggingface_hub", "tqdm", "asyncio")
    ours = ("surgery.adapters", "surgery.analysis.", "surgery.eval", "surgery.probing", "surgery.search",
            "surgery.mergekit.methods", "surgery.mergekit.runner")
    return [m for m in modules if (m.split(".")[0] in roots or m.startswith(ours))
            and m != "surgery.analysis.neuron_set"]  # constants the neuron operations declare their schema with


def swap_recipe(family, path: Path) -> Path:
    path.write_text(json.dumps({"inputs": {k: str(v) for k, v in family.items()}, "recipient": "task",
                                "operations": [{"layer_swap": {"donor": "lang", "bottom": 2, "top": 1}}]}))
    return path


def test_copy_only_run_imports_and_builds_only_what_it_uses(family, tmp_path):
    recipe = swap_recipe(family, tmp_path / "swap.yaml")
    got = probe("run", recipe, "-o", tmp_path / "out", "-q")
    assert list((tmp_path / "out").glob("*.safetensors")) and (tmp_path / "out" / "README.md").is_file()
    assert heavy(got["modules"]) == []
    # pydantic builds a validator only for the models the recipe uses (defer_build)
    assert got["built"] == ["layer_swap"]
    assert got["condition"] is False


def test_plan_with_other_operations_builds_those(family, tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"inputs": {k: str(v) for k, v in family.items()}, "recipient": "task",
                                "operations": [{"take": {"from": "lang", "select": {"layers": "0-1"}}},
                                               {"blend": {"weights": {"task": 0.5, "en": 0.5},
                                                          "select": {"layers": 3}}}]}))
    got = probe("plan", path, "--json", "--threads", "2")  # planning computes nothing: no torch for threads
    assert got["built"] == ["blend", "take"]
    assert heavy(got["modules"]) == []


@pytest.mark.parametrize("base_models, tags", [
    ([], ["merge", "model-surgery", "layer_swap"]),
    (["org/a", "org/b-1.5"], ["merge", "model-surgery", "merge", "mergekit"]),  # repeated tag: kept once
    (["Qwen/Qwen2.5-0.5B"], ["merge", "model-surgery", "take", "blend", "arithmetic", "transplant_neurons"]),
    (["ünï/cödé"], ["merge", "tag: with colon", "yes", "1.0", "null"]),  # quoting, unicode, YAML keywords
])
def test_front_matter_is_what_model_card_data_writes(base_models, tags):
    from huggingface_hub.repocard_data import ModelCardData

    from surgery.core.model_card import front_matter

    data = ModelCardData(base_model=base_models or None, base_model_relation="merge",
                         library_name="transformers", tags=tags)
    assert front_matter(base_models, tags) == data.to_yaml()
