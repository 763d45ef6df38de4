"""Helpers of the plugin tests (test_mergekit_plugin.py, test_mergekit_transplant.py): the tiny bf16 models, mergekit's
run_merge and `surgery run` side by side, and a bitwise comparison of two outputs. Their `models` fixture is in
conftest.py; `_restore_mergekit_registry` (autouse, module scope) is imported by name into each plugin test module.
"""

import pytest
from helpers import load, raw_bytes

N_LAYERS = 8


def mergekit_run(config: dict, out, **options):
    from surgery.mergekit.runner import run_mergekit

    return run_mergekit(config, out, options={"copy_tokenizer": False, "quiet": True, **options})


def surgery_run(inputs: dict, operations: list, out):
    import surgery

    surgery.run({"inputs": {k: str(v) for k, v in inputs.items()}, "operations": operations}, out)
    return out


def assert_same_tensors(a_dir, b_dir):
    a, b = load(a_dir), load(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert raw_bytes(a[name]) == raw_bytes(b[name]), name
    return a


def layer_of(name):
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


@pytest.fixture(autouse=True, scope="module")
def _restore_mergekit_registry():
    """register_all() adds to mergekit's global registry; leave it as this module found it."""
    from mergekit.merge_methods import registry

    saved = dict(registry._METHODS)
    yield
    registry._METHODS.clear()
    registry._METHODS.update(saved)
