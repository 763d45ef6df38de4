"""The model card `surgery run` writes beside every output: metadata, body, base models, tags, plots."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

from hub_kit import make_env, surgery_cli


# ---------------------------------------------------------------------------- model card

def test_card_metadata_and_body(output):
    from huggingface_hub import ModelCard

    card = ModelCard.load(output / "README.md")
    data = card.data.to_dict()
    assert data["base_model_relation"] == "merge"
    assert data["library_name"] == "transformers"
    assert data["tags"] == ["merge", "model-surgery", "layer_swap"]
    assert "base_model" not in data  # both inputs are local folders
    recipe_text = (output / "surgery_recipe.yaml").read_text()
    assert f"```yaml\n{recipe_text.rstrip()}\n```" in card.text
    assert "| 0-1 | lang (#1 layer_swap, swapped) |" in card.text
    assert "| 2 | 0.5·lang + 0.5·task (#1 layer_swap, transition) |" in card.text
    assert "| 3-4 | task (recipient) |" in card.text
    assert card.text.startswith("\n# swapped\n")  # titled after the output folder, not the temp dir
    assert "task expert with the language expert's outer layers" in card.text
    assert "![" not in card.text  # no plot was made


def test_card_base_model_from_hub_inputs(family, tmp_path, hf_home):
    """Hub ids (revision stripped) become base_model; a local folder that looks like org/name does not."""
    cache = hf_home / "hub" / "models--org--lang-expert"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(family["lang"], cache / "snapshots" / commit)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(commit)
    (tmp_path / "models").mkdir()
    shutil.copytree(family["task"], tmp_path / "models" / "task")
    (tmp_path / "recipe.yaml").write_text(
        "inputs:\n  task: models/task\n  lang: org/lang-expert@main\nrecipient: task\n"
        "operations:\n  - layer_swap: {donor: lang, bottom: 1}\n  - blend: {weights: {task: 1, lang: 1}, "
        "select: {layers: 4}}\n")
    env = make_env("http://127.0.0.1:9", hf_home, HF_HUB_OFFLINE="1")  # served from the cache
    proc = surgery_cli("run", "recipe.yaml", "-o", "out", "-q", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == ["org/lang-expert"]
    assert card.data.tags == ["merge", "model-surgery", "layer_swap", "blend"]
    assert "- `lang`: [org/lang-expert@main](https://huggingface.co/org/lang-expert)" in card.text
    assert "- `task`: a local checkpoint (recipient, config)" in card.text


def test_card_mergekit_tag():
    from surgery.core.model_card import card_tags
    from surgery.operations import OPERATIONS

    merge = OPERATIONS["merge"](method="linear", models=["a", "b"])
    plan = SimpleNamespace(recipe=SimpleNamespace(operations=[merge, merge]))
    assert card_tags(plan) == ["merge", "model-surgery", "mergekit"]
    take = OPERATIONS["take"](**{"from": "a"})
    plan = SimpleNamespace(recipe=SimpleNamespace(operations=[take, merge]))
    assert card_tags(plan) == ["merge", "model-surgery", "take", "mergekit"]
    plan = SimpleNamespace(recipe=SimpleNamespace(operations=[take]))
    assert card_tags(plan) == ["merge", "model-surgery", "take"]


def test_card_embeds_analysis_plot(output, tmp_path):
    import surgery
    from huggingface_hub import ModelCard

    folder = tmp_path / "with_plot"
    shutil.copytree(output, folder)
    (folder / "layer_changes.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    plan = surgery.build_plan(surgery.load_recipe(folder / "surgery_recipe.yaml"))
    surgery.write_model_card(folder, plan, (folder / "surgery_recipe.yaml").read_text(), name="swapped")
    card = ModelCard.load(folder / "README.md")
    assert "![layer_changes](layer_changes.png)" in card.text


def test_saved_recipe_of_an_in_memory_recipe_loads_back(output):
    """The recipe embedded in the card (and saved beside it) keeps operation names, so it runs again."""
    import surgery

    recipe = surgery.load_recipe(output / "surgery_recipe.yaml")
    assert [type(op).__name__ for op in recipe.operations] == ["LayerSwap"]
    assert recipe.operations[0].donor == "lang" and recipe.operations[0].transition == 1
