"""surgery run: exact values for swaps, transitions, arithmetic, blends; output files; config; manifest."""

import json
import shutil
import os
import subprocess
import sys

import pytest
import torch
from helpers import load, perturb, random_state, raw_bytes, save_checkpoint, tiny_config

import surgery
from surgery.io.checkpoint import sha256_file
from surgery.core.layout import Layout


def recipe(family, ops, recipient="task", **extra):
    return {"inputs": {k: str(v) for k, v in family.items()}, "recipient": recipient, "operations": ops, **extra}


def layer_of(name):
    return Layout.detect({"model_type": "llama"}, [name]).info(name).layer


def test_layer_swap_bytes_and_ramped_transition(family, tmp_path):
    out = tmp_path / "out"
    surgery.run(recipe(family, [{"layer_swap": {"donor": "lang", "bottom": 2, "top": 1, "transition": 2}}]), out)
    got, lang, task = load(out), load(family["lang"]), load(family["task"])
    # donor weight per layer for bottom=2, top=1, transition=2 over 8 layers
    expected_w = {0: 1, 1: 1, 2: 2 / 3, 3: 1 / 3, 4: 0, 5: 1 / 3, 6: 2 / 3, 7: 1}
    assert set(got) == set(task)
    for name, t in got.items():
        layer = layer_of(name)
        w = expected_w[layer] if layer is not None else 0
        if w == 1:
            assert raw_bytes(t) == raw_bytes(lang[name]), name
        elif w == 0:
            assert raw_bytes(t) == raw_bytes(task[name]), name
        else:
            blend = (lang[name].float() * w + task[name].float() * (1 - w)).to(torch.bfloat16)
            assert torch.equal(t, blend), name
            if not torch.equal(task[name], lang[name]):
                assert not torch.equal(t, task[name]) and not torch.equal(t, lang[name])


def test_layer_swap_explicit_layers_and_outer_tensors(family, tmp_path):
    out = tmp_path / "out"
    ops = [{"layer_swap": {"donor": "lang", "layers": "0, 6-7", "embeddings": "donor", "lm_head": 0.25}}]
    surgery.run(recipe(family, ops), out)
    got, lang, task = load(out), load(family["lang"]), load(family["task"])
    assert torch.equal(got["model.embed_tokens.weight"], lang["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], task["model.norm.weight"])
    head = lang["lm_head.weight"].float() * 0.25 + task["lm_head.weight"].float() * 0.75
    assert torch.equal(got["lm_head.weight"], head.to(torch.bfloat16))
    for n in got:
        if layer_of(n) in (0, 6, 7):
            assert torch.equal(got[n], lang[n])
        elif layer_of(n) is not None:
            assert torch.equal(got[n], task[n])


def test_arithmetic_equals_expression(family, tmp_path):
    out = tmp_path / "out"
    surgery.run(recipe(family, [{"arithmetic": {"expr": "task + 0.5*(lang - en)"}}], output={"dtype": "float32"}), out)
    got = load(out)
    t, lang, en = load(family["task"]), load(family["lang"]), load(family["en"])
    for n in got:
        want = t[n].float() * 1.0 + lang[n].float() * 0.5 + en[n].float() * -0.5
        assert got[n].dtype == torch.float32
        assert torch.equal(got[n], want), n
    # not a no-op
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], t["model.layers.0.mlp.up_proj.weight"].float())


def test_task_arithmetic_with_base_and_negative_coefficient(family, tmp_path):
    out = tmp_path / "out"
    surgery.run(recipe(family, [{"arithmetic": {"expr": "base + 1.0*(task - base) - 0.5*(lang - base)",
                                                "select": {"layers": "3-4", "modules": ["mlp"]}}}],
                       recipient="base", output={"dtype": "float32"}), out)
    got = load(out)
    b, t, lang = load(family["base"]), load(family["task"]), load(family["lang"])
    n = "model.layers.3.mlp.down_proj.weight"
    # coefficients collapse to task*1 + lang*(-0.5) + base*0.5, applied in that order
    want = t[n].float() * 1.0 + lang[n].float() * -0.5 + b[n].float() * 0.5
    assert torch.equal(got[n], want)
    # outside the selection: the recipient's bytes, cast to float32
    assert torch.equal(got["model.layers.3.self_attn.q_proj.weight"],
                       b["model.layers.3.self_attn.q_proj.weight"].float())
    assert torch.equal(got["model.layers.2.mlp.down_proj.weight"], b["model.layers.2.mlp.down_proj.weight"].float())


def test_later_operations_win_and_selection_kinds(family, tmp_path):
    out = tmp_path / "out"
    ops = [
        {"take": {"from": "lang", "select": {"layers": "0-3"}}},
        {"blend": {"weights": {"task": 3, "lang": 1}, "select": {"layers": [1], "modules": ["attn"]}}},
        {"take": {"from": "en", "select": {"names": ["re:layers\\.2\\..*down_proj"], "exclude": ["*.bias"]}}},
    ]
    surgery.run(recipe(family, ops), out)
    got, lang, task, en = load(out), load(family["lang"]), load(family["task"]), load(family["en"])
    q1 = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(got[q1], (task[q1].float() * 0.75 + lang[q1].float() * 0.25).to(torch.bfloat16))
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], lang["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.2.mlp.down_proj.weight"], en["model.layers.2.mlp.down_proj.weight"])
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], lang["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.5.mlp.up_proj.weight"], task["model.layers.5.mlp.up_proj.weight"])


def test_output_loads_with_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    surgery.run(recipe(family, [{"layer_swap": {"donor": "lang", "bottom": 2, "top": 2, "transition": 1}}]), out)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.arange(10).unsqueeze(0)).logits
    assert logits.shape == (1, 10, 128) and torch.isfinite(logits).all()
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_other_architectures_swap_and_load(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch)
    base = random_state(cfg, 0)
    a = save_checkpoint(tmp_path / "a", base, cfg)
    b = save_checkpoint(tmp_path / "b", perturb(base, None, 0.05, seed=4), cfg)
    out = tmp_path / "out"
    surgery.run({"inputs": {"a": str(a), "b": str(b)}, "operations": [
        {"layer_swap": {"donor": "b", "bottom": 1, "top": 1, "transition": 1}}]}, out)
    got, wa, wb = load(out), load(a), load(b)
    layout = Layout.detect(cfg.to_dict(), list(wa))
    assert layout.prefix in ("model.layers.", "transformer.h.")
    for n, t in got.items():
        layer = layout.info(n).layer
        if layer in (0, 7):
            assert torch.equal(t, wb[n]), n
        elif layer in (1, 6):
            assert torch.equal(t, wb[n].float() * 0.5 + wa[n].float() * 0.5), n
        else:
            assert torch.equal(t, wa[n]), n
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.arange(5).unsqueeze(0)).logits).all()


def test_shards_index_order_and_dtype(family, tmp_path):
    out = tmp_path / "out"
    surgery.run(recipe(family, [], output={"shard_size": "20KB", "dtype": "float16"}), out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for f in shards:
        size = (out / f).stat().st_size
        assert size < 20_000 + 4096  # data + header; one tensor never exceeds 20KB here
    got, task = load(out), load(family["task"])
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in got.values())
    assert all(t.dtype == torch.float16 for t in got.values())
    assert torch.equal(got["model.layers.5.mlp.up_proj.weight"], task["model.layers.5.mlp.up_proj.weight"].half())
    # tensors are ordered by layer: embeddings, layer 0..7, then final norm and lm_head
    names = list(index["weight_map"])
    layers = [layer_of(n) for n in names]
    inner = [x for x in layers if x is not None]
    assert inner == sorted(inner) and names[0] == "model.embed_tokens.weight"
    assert layers[-1] is None and layers[-2] is None
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_stack_changes_layer_count_and_patches_layer_types(tmp_path):
    cfg = tiny_config("gemma3")
    cfg.layer_types = ["sliding_attention" if i % 4 else "full_attention" for i in range(8)]
    state = random_state(cfg, 0)
    src = save_checkpoint(tmp_path / "g", state, cfg)
    out = tmp_path / "out"
    surgery.run({"inputs": {"g": str(src)}, "stack": [{"layers": "0-5"}, {"layers": "4-7"}]}, out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 10
    src_layers = [0, 1, 2, 3, 4, 5, 4, 5, 6, 7]
    assert config["layer_types"] == [cfg.layer_types[j] for j in src_layers]
    got = load(out)
    for i, j in enumerate(src_layers):
        n = f"model.layers.{i}.mlp.down_proj.weight"
        assert torch.equal(got[n], state[f"model.layers.{j}.mlp.down_proj.weight"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 10


def test_manifest_recipe_and_support_files(family, tmp_path):
    shutil.copytree(family["task"], tmp_path / "task")  # a copy: the shared fixture is not written to
    family = {**family, "task": tmp_path / "task"}
    (family["task"] / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    out = tmp_path / "out"
    r = recipe(family, [{"take": {"from": "lang", "select": {"layers": "0"}}}], description="demo run")
    result = surgery.run(r, out)
    m = json.loads((out / "surgery_manifest.json").read_text())
    assert m["version"] == surgery.__version__ and m["description"] == "demo run"
    assert m["inputs"]["lang"]["sha256"]["model.safetensors"] == sha256_file(family["lang"] / "model.safetensors")
    rows = {row["layer"]: row for row in m["plan"]["layers"]}
    assert rows[0]["sources"][0]["from"] == "lang" and rows[0]["sources"][0]["rule"] == "#1 take"
    assert rows[1]["sources"][0]["from"] == "task"
    assert (out / "tokenizer_config.json").exists() and (out / "config.json").exists()
    # the stored recipe (made from a dict here) loads back into the same plan
    again = surgery.build_plan(surgery.load_recipe(out / "surgery_recipe.yaml"))
    assert again.to_dict()["tensors"] == result.plan.to_dict()["tensors"]
    assert result.files == sorted(os.listdir(out))


def test_existing_output_needs_force(family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(surgery.SurgeryError, match="already exists; pass --force"):
        surgery.run(recipe(family, []), out)
    assert (out / "keep.txt").exists()
    with pytest.raises(surgery.SurgeryError, match="--force replaces only a previous surgery output"):
        surgery.run(recipe(family, []), out, force=True)  # an arbitrary folder is never replaced
    assert (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    surgery.run(recipe(family, []), out, force=True)  # an empty folder may be
    (out / "keep.txt").write_text("x")
    surgery.run(recipe(family, []), out, force=True)  # and so may a previous output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs or lock left


def _big_checkpoint(path):
    """~200 MB float32, written tensor-free of transformers, so a run takes a few seconds."""
    from safetensors.torch import save_file

    cfg = tiny_config("llama", hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                      num_key_value_heads=8, num_hidden_layers=8)
    path.mkdir()
    cfg.save_pretrained(path)
    state = {"model.embed_tokens.weight": torch.randn(128, 512)}
    for i in range(8):
        for k, shape in [("mlp.up_proj", (2048, 512)), ("mlp.gate_proj", (2048, 512)), ("mlp.down_proj", (512, 2048)),
                         ("self_attn.q_proj", (512, 512)), ("self_attn.k_proj", (512, 512)),
                         ("self_attn.v_proj", (512, 512)), ("self_attn.o_proj", (512, 512))]:
            state[f"model.layers.{i}.{k}.weight"] = torch.randn(shape)
    save_file(state, str(path / "model.safetensors"))
    return path


@pytest.mark.slow
def test_killed_run_leaves_no_complete_looking_output(tmp_path):
    import signal
    import time

    src = _big_checkpoint(tmp_path / "big")
    r = tmp_path / "r.yaml"
    r.write_text(f"inputs: {{a: {src}}}\noutput: {{shard_size: 4MB}}\noperations:\n"
                 "  - arithmetic: {expr: 'a * 0.5 + a * 0.5'}\n")
    for sig in (signal.SIGKILL, signal.SIGTERM):
        out = tmp_path / f"out{int(sig)}"
        proc = subprocess.Popen([sys.executable, "-m", "surgery", "run", str(r), "-o", str(out), "-q"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        pattern = f".{out.name}.surgery-tmp-*"
        deadline = time.time() + 60
        while time.time() < deadline:
            tmps = list(tmp_path.glob(pattern))
            if tmps and len(list(tmps[0].glob("*.safetensors"))) >= 2:
                break
            time.sleep(0.02)
        else:
            proc.kill()
            pytest.fail("run never started writing shards")
        proc.send_signal(sig)
        proc.wait(30)
        assert not out.exists(), f"output appeared after {sig!r}"
        left = list(tmp_path.glob(pattern))
        if sig == signal.SIGTERM:
            assert left == [] and proc.returncode == 130
        else:
            assert len(left) == 1  # a hidden temp dir, never at the output path
            killed = out
    # the next run cleans the dead run's temp dir and succeeds
    subprocess.run([sys.executable, "-m", "surgery", "run", str(r), "-o", str(killed), "-q"], check=True)
    assert (killed / "model.safetensors.index.json").exists()
    assert list(tmp_path.glob(".out*.surgery-tmp-*")) == []


def test_large_tensors_computed_in_row_blocks_give_the_same_bytes(family, tmp_path, monkeypatch):
    import surgery.core.execute as ex

    # the torch path (tests/core/test_host_math.py: the numpy path's blocks)
    monkeypatch.setenv("SURGERY_BACKEND", "torch")
    r = recipe(family, [{"arithmetic": {"expr": "task + 0.3*(lang - en)"}},
                        {"layer_swap": {"donor": "lang", "bottom": 1, "top": 1, "transition": 2, "lm_head": 0.3}}])
    surgery.run(r, tmp_path / "whole")
    calls = []
    real = ex.compute_in_blocks
    monkeypatch.setattr(ex, "BLOCK_BYTES", 1000)  # blocks of a few rows even on the tiny model
    monkeypatch.setattr(ex, "compute_in_blocks", lambda e, inputs: calls.append(e.name) or real(e, inputs))
    surgery.run(r, tmp_path / "blocks")
    assert "lm_head.weight" in calls and "model.layers.3.mlp.down_proj.weight" in calls
    whole, blocks = load(tmp_path / "whole"), load(tmp_path / "blocks")
    assert whole.keys() == blocks.keys()
    for n in whole:
        assert raw_bytes(whole[n]) == raw_bytes(blocks[n]), n


def test_checkpoint_reads_row_ranges(family):
    from surgery.io.checkpoint import Checkpoint

    ck = Checkpoint.open(family["lang"])
    n = "model.layers.2.mlp.up_proj.weight"
    assert torch.equal(ck.get(n, rows=(5, 17)), ck.get(n)[5:17])
