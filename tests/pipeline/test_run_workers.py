"""`surgery run --workers/--ray-address/--shard-size`: one plan split by output shard, the bytes of a serial run."""

import json
import socket

import pytest
import torch
from helpers import load, random_state, raw_bytes, run_cli, save_checkpoint, tiny_config

import surgery
from surgery.core.execute import execute, shard_specs
from surgery.io.writer import shard_layout

SHARD = "30KB"  # the family's 140 KB in 5 shards
OPERATIONS = """\
operations:
  - layer_swap: {donor: lang, bottom: 2, top: 1, transition: 2}
  - merge:
      method: ties
      base: base
      models:
        lang: {weight: 0.5, density: 0.5}
        task: {weight: 0.8, density: 0.3}
      select: {layers: "3-4"}
  - arithmetic: {expr: "task + 0.5*(lang - en)", select: {modules: [embed, lm_head]}}
"""


def write_recipe(folder, family, shard_size=SHARD):
    inputs = "".join(f"  {name}: {path}\n" for name, path in family.items())
    path = folder / "recipe.yaml"
    path.write_text(f"inputs:\n{inputs}recipient: task\n{OPERATIONS}output: {{shard_size: {shard_size}}}\n")
    return path


def shard_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("model"))


def test_shards_written_one_by_one_equal_the_whole_run(family, tmp_path, monkeypatch):
    """What each Ray task does (execute with ``shards=[i]``), without Ray: every shard alone is the serial bytes,
    and it reads (or copies) only the tensors of its shard."""
    from surgery.io.checkpoint import Checkpoint
    from surgery.io.writer import ShardedWriter

    plan = surgery.build_plan(write_recipe(tmp_path, family))
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    files = execute(plan, whole)
    layout = shard_layout(*shard_specs(plan))
    assert len(files) == len(layout) == 5
    touched = set()
    read_into, copy = Checkpoint.read_into, ShardedWriter.copy
    monkeypatch.setattr(Checkpoint, "read_into", lambda self, name, *a: (touched.add(name), read_into(self, name, *a)))
    monkeypatch.setattr(ShardedWriter, "copy", lambda self, name, *a: (touched.add(name), copy(self, name, *a)))
    for i in reversed(range(len(layout))):  # any order: each shard's header and offsets come from the plan
        touched.clear()
        assert execute(plan, parts, shards=[i]) == [files[i]]
        assert touched == {name for name, _ in layout[i]}  # this recipe reads each output's own name
    assert shard_files(parts) == files  # no index: the coordinator writes it
    for f in files:
        assert (parts / f).read_bytes() == (whole / f).read_bytes(), f
    # the max_shard_size rule: greedy in plan order, a new shard when the next tensor would pass the size
    sizes = [sum(m.nbytes for _, m in shard) for shard in layout]
    assert all(s <= 30_000 for s in sizes) and all(a + layout[i + 1][0][1].nbytes > 30_000
                                                   for i, a in enumerate(sizes[:-1]))


@pytest.mark.slow
def test_ray_workers_write_the_bytes_of_a_serial_run(family, tmp_path):
    recipe = write_recipe(tmp_path, family)
    serial = surgery.run(recipe, tmp_path / "serial")
    result = surgery.run(recipe, tmp_path / "ray", workers=2)
    a, b = serial.output, result.output
    assert result.files == serial.files and len(shard_files(a)) == 6  # 5 shards + the index
    for f in shard_files(a):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    manifests = [json.loads((d / "surgery_manifest.json").read_text()) for d in (a, b)]
    for m in manifests:
        del m["created"]
    assert manifests[0] == manifests[1]
    # real values: swapped layers are the donor's bytes, the rest of layer 5 a 1/3 transition
    got, lang, task = load(b), load(family["lang"]), load(family["task"])
    name = "model.layers.0.self_attn.q_proj.weight"
    assert raw_bytes(got[name]) == raw_bytes(lang[name])
    name = "model.layers.5.mlp.up_proj.weight"
    assert torch.equal(got[name], (lang[name].float() * (1 / 3) + task[name].float() * (2 / 3)).bfloat16())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(b)  # the index the coordinator wrote
    assert all(torch.equal(t, got[k]) for k, t in model.state_dict().items() if k in got)
    import ray

    assert not ray.is_initialized()  # the local Ray started for the run is shut down


def inf_family(tmp_path):
    """Two checkpoints whose difference overflows in layer 6 only (the fourth of five shards below)."""
    cfg = tiny_config("llama")
    state = random_state(cfg, 0)
    big = {k: v.clone() for k, v in state.items()}
    big["model.layers.6.mlp.up_proj.weight"][0, 0] = float("inf")
    return {"a": save_checkpoint(tmp_path / "a", state, cfg), "b": save_checkpoint(tmp_path / "b", big, cfg)}


@pytest.mark.slow
def test_a_failing_task_is_the_serial_error_and_writes_nothing(tmp_path):
    ck = inf_family(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs: {{a: {ck['a']}, b: {ck['b']}}}\nrecipient: a\n"
                      "operations:\n  - arithmetic: {expr: 'a + 0.5*(b - a)'}\n")
    out = tmp_path / "out" / "merged"
    serial = run_cli("run", recipe, "-o", out, "--shard-size", "60KB")
    ray = run_cli("run", recipe, "-o", out, "--shard-size", "60KB", "--workers", "2")
    assert serial.returncode == ray.returncode == 1
    error = [line for line in ray.stderr.splitlines() if line.startswith("error:")]
    assert error == [serial.stderr.strip()] and "model.layers.6.mlp.up_proj.weight" in error[0]
    assert "Traceback" not in ray.stderr
    assert not (tmp_path / "out").exists()  # no target, no temp dir, no lock: the parent it made is gone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_ray_address_is_one_line_and_writes_nothing(family, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    res = run_cli("run", write_recipe(tmp_path, family), "-o", tmp_path / "out", "--ray-address", address)
    assert res.returncode == 1
    assert res.stderr == (f"error: cannot join Ray at {address}: Connection refused "
                          "(is a Ray head running there?)\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--shard-size", "big"], "error: --shard-size: expected a size like 500MB or 2GB, got 'big'\n"),
    (["--shard-size", "0"], "error: --shard-size: shard size must be positive\n"),
    (["--workers", "2", "--device", "cuda"],
     "error: --device cuda: --workers/--ray-address run on CPU only (Ray tasks get no GPU)\n"),
])
def test_bad_run_options(family, tmp_path, args, message):
    res = run_cli("run", write_recipe(tmp_path, family), "-o", tmp_path / "out", *args)
    assert (res.returncode, res.stderr) == (1, message)
    assert not (tmp_path / "out").exists()


def test_shard_size_option_overrides_the_recipe(family, tmp_path):
    recipe = write_recipe(tmp_path, family, shard_size="5GB")
    res = run_cli("run", recipe, "-o", tmp_path / "out", "--shard-size", "60KB", "--json")
    assert res.returncode == 0, res.stderr
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    manifest = json.loads((tmp_path / "out" / "surgery_manifest.json").read_text())
    assert manifest["output"]["shard_size"] == "60KB" and len(manifest["output"]["shards"]) == 3


def test_workers_count_and_missing_ray(family, tmp_path, monkeypatch):
    from surgery.errors import SurgeryError

    recipe = write_recipe(tmp_path, family)
    with pytest.raises(SurgeryError, match=r"^--workers takes a count >= 1, got -1$"):
        surgery.run(recipe, tmp_path / "out", workers=-1)
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(SurgeryError, match=r"^--workers/--ray-address need Ray: pip install 'surgery\[search\]' "
                                           r"\(or ray>=2.9\)$"):
        surgery.run(recipe, tmp_path / "out", workers=2)
    assert not (tmp_path / "out").exists()


def test_task_errors_are_one_line():
    import ray

    from surgery.core.cluster import task_error
    from surgery.errors import SurgeryError

    own = ray.exceptions.RayTaskError("write_shard", "Traceback ...", SurgeryError("tensor 'x': 2 non-finite values"))
    assert str(task_error(ray, own, "the task writing s")) == "tensor 'x': 2 non-finite values"
    bug = ray.exceptions.RayTaskError("write_shard", "Traceback ...", ValueError("boom\n  detail"))
    assert str(task_error(ray, bug, "the task writing s")) == "the task writing s failed on Ray: ValueError: boom"
    lost = ray.exceptions.WorkerCrashedError()
    assert str(task_error(ray, lost, "the task writing s")).startswith(
        "the task writing s failed on Ray: WorkerCrashedError: The worker died unexpectedly")


MULTI_STAGE = """\
name: first
models:
  - model: {lang}
    parameters: {{weight: 0.5}}
  - model: {task}
    parameters: {{weight: 0.5}}
merge_method: linear
dtype: bfloat16
---
models:
  - model: first
    parameters: {{weight: 0.3}}
  - model: {en}
    parameters: {{weight: 0.7}}
merge_method: ties
base_model: {base}
parameters: {{density: 0.5}}
dtype: bfloat16
"""


@pytest.mark.slow
def test_ray_runs_a_multi_stage_config_its_stage_computed_in_the_tasks(family, tmp_path):
    """The first stage is never written: each task computes the tensors of it that its shard needs."""
    config = tmp_path / "multi.yml"
    config.write_text(MULTI_STAGE.format(**family))
    serial = surgery.run(config, tmp_path / "serial", shard_size="40KB")
    result = surgery.run(config, tmp_path / "ray", workers=2, shard_size="40KB")
    files = shard_files(serial.output)
    assert len(files) == 5 and shard_files(result.output) == files
    for f in files:
        assert (serial.output / f).read_bytes() == (result.output / f).read_bytes(), f
