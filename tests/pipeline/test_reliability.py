"""Reliability beyond single bad files: inputs changed during a run, cancelled hashing, free space and a
full disk, permissions, PEFT's target_modules rule, and a killed CLI run leaving nothing behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings

import pytest
import torch
from corpus import make_good
from safetensors.torch import load_file, save_file

import surgery
from surgery.io.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_good(tmp_path_factory.mktemp("rel") / "good")


def test_file_replaced_after_open_is_refused(good, tmp_path):
    src = shutil.copytree(good, tmp_path / "m")
    ck = Checkpoint.open(src)
    state = load_file(str(src / "model.safetensors"))
    save_file({k: v + 1 for k, v in state.items()}, str(tmp_path / "new.safetensors"))
    os.replace(tmp_path / "new.safetensors", src / "model.safetensors")
    with pytest.raises(surgery.SurgeryError, match=r"model.safetensors: the file changed after it was opened "
                                                   r"\(replaced during the run\?\)$"):
        ck.get("lm_head.weight")
    with pytest.raises(surgery.SurgeryError, match="the file changed during the run"):
        ck.check_unchanged()


def test_file_deleted_after_open_is_refused(good, tmp_path):
    src = shutil.copytree(good, tmp_path / "m")
    ck = Checkpoint.open(src)
    (src / "model.safetensors").unlink()
    with pytest.raises(surgery.SurgeryError, match=r"cannot open: No such file or directory \(was it deleted or "
                                                   r"moved during the run\?\)$"):
        ck.get("lm_head.weight")
    with pytest.raises(surgery.SurgeryError, match="was deleted or moved during the run"):
        ck.check_unchanged()


def test_file_modified_while_open_fails_the_run_check(good, tmp_path):
    src = shutil.copytree(good, tmp_path / "m")
    ck = Checkpoint.open(src)
    before = ck.get("lm_head.weight").clone()  # the handle is open: reads still see one inode
    with open(src / "model.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x7f\x7f\x7f\x7f")
    with pytest.raises(surgery.SurgeryError, match="the file changed during the run"):
        ck.check_unchanged()
    assert before.shape == ck.get("lm_head.weight").shape


def test_failed_run_cancels_pending_hashes(tmp_path, monkeypatch):
    """The run fails at its first tensor; the 200 MB input's hash is cancelled, not finished."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    from helpers import tiny_config

    src = tmp_path / "big"
    cfg = tiny_config("llama", architectures=["LlamaForCausalLM"], num_hidden_layers=1, vocab_size=128,
                      hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8)
    src.mkdir()
    cfg.save_pretrained(src)
    state = {"model.embed_tokens.weight": torch.full((128, 512), float("nan")),
             "model.norm.weight": torch.ones(512), "lm_head.weight": torch.zeros(128, 512),
             "model.layers.0.input_layernorm.weight": torch.ones(512),
             "model.layers.0.post_attention_layernorm.weight": torch.ones(512)}
    for k, shape in [("mlp.up_proj", (2048, 512)), ("mlp.gate_proj", (2048, 512)), ("mlp.down_proj", (512, 2048)),
                     ("self_attn.q_proj", (512, 512)), ("self_attn.k_proj", (512, 512)),
                     ("self_attn.v_proj", (512, 512)), ("self_attn.o_proj", (512, 512))]:
        state[f"model.layers.0.{k}.weight"] = torch.zeros(shape)
    save_file(state, str(src / "model.safetensors"))
    pad = tmp_path / "pad.safetensors"  # a second, large input: its hash is queued behind the first
    save_file({"x": torch.zeros(50_000_000)}, str(pad))
    recipe = {"inputs": {"a": str(src), "b": str(pad)}, "operations": [{"arithmetic": {"expr": "a * 0.5"}}]}
    with pytest.raises(surgery.SurgeryError, match="non-finite values"):
        surgery.run(recipe, tmp_path / "out")
    import time

    time.sleep(0.5)  # a hash that was not cancelled would finish and be cached by now (or soon after)
    cached = list((tmp_path / "cache" / "sha256").glob("*")) if (tmp_path / "cache" / "sha256").exists() else []
    assert len(cached) <= 1  # at most the file being hashed when the run failed; the queued one never starts
    assert not (tmp_path / "out").exists()


def test_free_space_is_checked_before_writing(good, tmp_path, monkeypatch):
    import surgery.io.output as output

    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(surgery.SurgeryError) as e:
        surgery.run({"inputs": {"a": str(good)}}, tmp_path / "new" / "out")
    assert str(e.value) == f"{tmp_path}/new/out: not enough free space: the output needs about 16.9 MB, 1.0 KB free"
    assert list(tmp_path.iterdir()) == []  # created parents removed


def test_disk_full_while_writing_cleans_up_and_says_how_much(good, tmp_path, monkeypatch):
    from surgery.io.writer import ShardedWriter

    def full(self, name, *data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ShardedWriter, "write", full)  # computed tensors
    monkeypatch.setattr(ShardedWriter, "copy", full)   # copied byte ranges (this plan copies every tensor)
    with pytest.raises(surgery.SurgeryError) as e:
        surgery.run({"inputs": {"a": str(good)}}, tmp_path / "new" / "out")
    plan = surgery.build_plan({"inputs": {"a": str(good)}})
    from surgery.io.output import SPACE_MARGIN, format_size

    assert str(e.value) == (f"{tmp_path}/new/out: disk full while writing the output; the output needs about "
                            f"{format_size(plan.total_bytes + SPACE_MARGIN)}; nothing was written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied_on_the_output_parent(good, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(surgery.SurgeryError, match="Permission denied"):
            surgery.run({"inputs": {"a": str(good)}}, parent / "sub" / "out")
    finally:
        parent.chmod(0o700)
    assert list(parent.iterdir()) == []


def test_force_replaces_previous_outputs_of_every_command(good, tmp_path):
    """--force replaces what surgery wrote (a run, an adapter), and nothing else."""
    tuned = shutil.copytree(good, tmp_path / "tuned")
    state = load_file(str(tuned / "model.safetensors"))
    save_file({k: v * 1.01 for k, v in state.items()}, str(tuned / "model.safetensors"))
    surgery.extract_lora(str(good), str(tuned), tmp_path / "lora", rank=2)
    assert json.loads((tmp_path / "lora" / ".surgery-output").read_text())["command"] == "adapter"
    surgery.extract_lora(str(good), str(tuned), tmp_path / "lora", rank=1, force=True)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 1
    surgery.run({"inputs": {"a": str(good)}}, tmp_path / "out")
    assert not (tmp_path / "out" / ".surgery-output").exists()  # a run output is known by its manifest
    surgery.run({"inputs": {"a": str(good)}}, tmp_path / "out", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "out", "tuned"]


def test_adapter_tensors_outside_target_modules_are_ignored_as_peft_does(good, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from surgery.adapters.view import open_adapter

    tuned = shutil.copytree(good, tmp_path / "tuned")
    state = load_file(str(tuned / "model.safetensors"))
    gen = torch.Generator().manual_seed(3)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()},
              str(tuned / "model.safetensors"))
    surgery.extract_lora(str(good), str(tuned), tmp_path / "lora", rank=2)
    cfg_path = tmp_path / "lora" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = ["q_proj", "down_proj"]  # the file still holds k/v/o/up/gate tensors
    cfg_path.write_text(json.dumps(cfg))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        view = open_adapter(tmp_path / "lora", str(good))
    assert any("not in target_modules, as PEFT does" in str(w.message) for w in caught)
    model = AutoModelForCausalLM.from_pretrained(good, dtype=torch.float32)
    ref = PeftModel.from_pretrained(model, tmp_path / "lora").merge_and_unload().state_dict()
    base = load_file(str(good / "model.safetensors"))
    for name in base:
        got = view.get_float(name)
        assert torch.allclose(got, ref[name].float(), atol=1e-6, rtol=1e-5), name
    assert torch.equal(view.get_float("model.layers.0.self_attn.k_proj.weight"),
                       base["model.layers.0.self_attn.k_proj.weight"])
    assert not torch.equal(view.get_float("model.layers.0.self_attn.q_proj.weight"),
                           base["model.layers.0.self_attn.q_proj.weight"])
