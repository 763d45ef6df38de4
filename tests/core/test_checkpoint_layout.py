"""Reading checkpoints (dir, shards, file, Hub id) and classifying tensor names of many architectures."""

import warnings

import pytest
import torch
from helpers import random_state, save_checkpoint, tiny_config

from surgery.io.checkpoint import Checkpoint
from surgery.errors import SurgeryError
from surgery.core.layout import Layout


def test_directory_single_file_and_shards(tmp_path):
    cfg = tiny_config("llama")
    state = random_state(cfg, 0)
    names = list(state)
    single = save_checkpoint(tmp_path / "single", state, cfg)
    sharded = save_checkpoint(tmp_path / "sharded", state, cfg, shard_names=[names[:20], names[20:]])
    for ck in (Checkpoint.open(single), Checkpoint.open(sharded), Checkpoint.open(single / "model.safetensors")):
        assert set(ck.keys()) == set(names)
        n = "model.layers.3.mlp.up_proj.weight"
        assert ck.meta[n].shape == (48, 32) and ck.meta[n].dtype == "F32"
        assert torch.equal(ck.get(n), state[n])
    assert len(Checkpoint.open(sharded).files) == 2
    assert Checkpoint.open(sharded).config["model_type"] == "llama"


def test_relative_paths_resolve_against_base_dir(tmp_path):
    cfg = tiny_config("llama")
    save_checkpoint(tmp_path / "m", random_state(cfg, 0), cfg)
    assert Checkpoint.open("m", base_dir=tmp_path).root == (tmp_path / "m").resolve()


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    cfg = tiny_config("llama")
    local = save_checkpoint(tmp_path / "cache" / "snap", random_state(cfg, 0), cfg)
    calls = []

    def fake(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, allow_patterns))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    ck = Checkpoint.open("someorg/some-model@v1.0")
    assert calls[0][:2] == ("someorg/some-model", "v1.0")
    assert "*.safetensors" in calls[0][2] and "*.json" in calls[0][2] and not any("bin" in p for p in calls[0][2])
    assert ck.revision == "v1.0" and "model.embed_tokens.weight" in ck


def test_hub_errors_are_one_line(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fail(*a, **k):
        raise LocalEntryNotFoundError("Cannot find the requested files in the local cache.\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(SurgeryError, match=r"cannot fetch 'org/missing' from the Hub: Cannot find") as e:
        Checkpoint.open("org/missing")
    assert "\n" not in str(e.value)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SurgeryError, match="no safetensors weights"):
        Checkpoint.open(tmp_path / "empty")
    (tmp_path / "bad.safetensors").write_bytes(b"\x05")
    with pytest.raises(SurgeryError, match="not a safetensors file"):
        Checkpoint.open(tmp_path / "bad.safetensors")
    with pytest.raises(SurgeryError, match="neither a local path nor a Hub id"):
        Checkpoint.open("./definitely/not/here")


# expected (layer count, kinds present) per architecture, from real transformers state dicts
ARCHS = {
    "llama": {"attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm"},
    "qwen2": {"attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm"},
    "gemma3": {"attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm"},
    "phi3": {"attn_qkv", "attn_o", "mlp_gate_up", "mlp_down", "norm"},
    "gpt2": {"attn_qkv", "attn_o", "mlp_up", "mlp_down", "norm"},
    "gpt_neox": {"attn_qkv", "attn_o", "mlp_up", "mlp_down", "norm"},
    "bert": {"attn_q", "attn_k", "attn_v", "attn_o", "mlp_up", "mlp_down", "norm"},
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_layout_of_real_architectures(arch):
    cfg = tiny_config(arch)
    state = random_state(cfg, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known architectures never fall back
        layout = Layout.detect(cfg.to_dict(), list(state))
    infos = [layout.info(n) for n in state]
    layer_infos = [i for i in infos if i.layer is not None]
    assert {i.layer for i in layer_infos} == set(range(8))
    kinds = {i.kind for i in layer_infos}
    assert kinds == ARCHS[arch], (arch, kinds)
    outside = {i.kind for i in infos if i.layer is None}
    assert "embed" in outside
    if arch != "bert":
        assert "final_norm" in outside
    # every MLP weight has a neuron axis whose length is the intermediate size
    inter = {"gpt2": 4 * 32}.get(arch, 48)
    for i in layer_infos:
        if i.kind.startswith("mlp_") and i.suffix.endswith("weight"):
            fused = 2 if i.kind == "mlp_gate_up" else 1  # phi3 stacks gate and up rows
            assert state[i.name].shape[i.neuron_axis] == fused * inter, i


@pytest.mark.parametrize("model_type", ["mistral", "qwen3", "gemma", "gemma2"])
def test_more_llama_like_families_by_config(model_type):
    import transformers

    cls = {"mistral": transformers.MistralConfig, "qwen3": transformers.Qwen3Config,
           "gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config}[model_type]
    cfg = cls(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64, head_dim=8)
    state = random_state(cfg, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layout = Layout.detect(cfg.to_dict(), list(state))
    kinds = {layout.info(n).kind for n in state}
    assert {"attn_q", "mlp_down", "embed", "final_norm"} <= kinds and "other" not in kinds


def test_unknown_architecture_falls_back_with_warning():
    names = ["encoder.blocks.0.ffn.up_proj.weight", "encoder.blocks.1.attn.q_proj.weight", "head.weight"]
    with pytest.warns(UserWarning, match="generic '.N.' rule"):
        layout = Layout.detect({"model_type": "mystery"}, names)
    assert layout.info(names[0]).layer == 0 and layout.info(names[0]).kind == "mlp_up"
    assert layout.info(names[1]).layer == 1 and layout.info(names[1]).kind == "attn_q"
    assert layout.info(names[2]).layer is None
