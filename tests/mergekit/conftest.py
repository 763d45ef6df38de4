"""Fixtures of the mergekit tests: ``moe``, the tiny mixture-of-experts checkpoints (test_moe*.py), and ``models``,
the plugin tests' tiny llama checkpoints (test_mergekit_plugin.py, test_mergekit_transplant.py; the parity and
config tests define ``models`` fixtures of their own, which take precedence in their modules)."""

import pytest
import torch
from helpers import perturb, random_state, save_checkpoint, tiny_config
from moe_kit import moe_config, saved_model


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "qwen3_moe"])
def moe(request, tmp_path_factory):
    """{arch, base, a, b, donor (paths), state (base's per-expert tensors), memory (its fused state)}."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    state, memory = saved_model(arch, root / "saved")
    cfg = moe_config(arch)
    out = {"arch": arch, "root": root, "state": state, "memory": memory, "cfg": cfg}
    for i, name in enumerate(("a", "b")):
        out[name] = save_checkpoint(root / name, perturb(state, None, 0.02, seed=i + 1), cfg, dtype=torch.bfloat16)
    out["base"] = save_checkpoint(root / "base", state, cfg, dtype=torch.bfloat16)
    out["donor"] = save_checkpoint(root / "donor", perturb(state, None, 0.5, seed=7), cfg, dtype=torch.bfloat16)
    return out


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
