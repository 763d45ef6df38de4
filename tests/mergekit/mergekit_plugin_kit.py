"""Helpers of the plugin tests (test_mergekit_plugin.py, test_mergekit_transplant.py): the tiny bf16 models, mergekit's
run_merge and `surgery run` side by side, and a bitwise comparison of two outputs. The fixtures are imported by
name into each test module (tests/mergekit has other `models` fixtures, so they are not in its conftest.py).
"""

import pytest
import torch
from helpers import load, perturb, random_state, raw_bytes, save_checkpoint, tiny_config

N_LAYERS = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny bf16 llama checkpoints that differ in every tensor (so blends are visible).

    mergekit needs `architectures` in config.json, which the shared tiny_config leaves out.
    """
    root = tmp_path_factory.mktemp("mk_plugin")
    cfg = tiny_config("llama", architectures=["LlamaForCausalLM"])
    base = random_state(cfg, seed=0)
    states = {"base": base, "task": perturb(base, None, 0.05, seed=2), "lang": perturb(base, None, 0.05, seed=1),
              "en": perturb(base, None, 0.05, seed=3)}
    return {n: save_checkpoint(root / n, s, cfg, dtype=torch.bfloat16) for n, s in states.items()}


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
