"""Fixtures of the io tests: a sharded `surgery run` output, and an empty HF_HOME."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def output(family, tmp_path_factory):
    """A sharded `surgery run` output: the task expert with the language expert's outer layers."""
    import surgery

    root = tmp_path_factory.mktemp("hub_out")
    recipe = {"description": "task expert with the language expert's outer layers",
              "inputs": {"task": str(family["task"]), "lang": str(family["lang"])}, "recipient": "task",
              "output": {"shard_size": "40KB"},
              "operations": [{"layer_swap": {"donor": "lang", "bottom": 2, "top": 2, "transition": 1}}]}
    result = surgery.run(recipe, root / "swapped")
    assert len(list(result.output.glob("*.safetensors"))) > 1
    return result.output



@pytest.fixture
def hf_home(tmp_path):
    home = tmp_path / "hf_home"
    home.mkdir()
    return home


