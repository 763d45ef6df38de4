"""Fixtures of the CLI tests: a real tiny checkpoint and its relatives, copied into a fresh working folder."""

from __future__ import annotations

import shutil

import pytest
from corpus import copy_ckpt, make_good

ST = "model.safetensors"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """good/ (a tiny llama), good2/ (perturbed), lora/ (a LoRA of good2 on good), sharded/ (good in 2 shards)."""
    import torch
    from safetensors.torch import load_file, save_file

    import surgery

    root = tmp_path_factory.mktemp("assets")
    good = make_good(root / "good")
    state = load_file(str(good / ST))
    gen = torch.Generator().manual_seed(1)
    good2 = copy_ckpt(good, root / "good2")
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}, str(good2 / ST),
              metadata={"format": "pt"})
    surgery.extract_lora(str(good), str(good2), root / "lora", rank=2)
    from helpers import save_checkpoint
    from transformers import AutoConfig

    names = sorted(state)
    save_checkpoint(root / "sharded", state, AutoConfig.from_pretrained(good),
                    shard_names=[names[: len(names) // 2], names[len(names) // 2:]])
    return root


@pytest.fixture
def work(assets, tmp_path, monkeypatch):
    w = tmp_path / "w"
    w.mkdir()
    for name in ("good", "good2", "lora", "sharded"):
        shutil.copytree(assets / name, w / name)
    monkeypatch.chdir(w)
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    return w
