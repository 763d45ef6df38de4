"""Fixtures of the mergekit tests: ``moe``, the tiny mixture-of-experts checkpoints (test_moe*.py)."""

import pytest
import torch
from helpers import perturb, save_checkpoint
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
