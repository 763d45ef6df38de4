"""Copy-only tensors: kernel copies of byte ranges (with fallbacks), coalesced runs, identical bytes, no torch."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load, raw_bytes

import surgery
import surgery.io.copy as copy_mod
from surgery.core import execute as execute_mod
from surgery.io.copy import copy_range
from surgery.io.safetensors import read_header


@pytest.fixture(autouse=True)
def fresh_refusals():
    copy_mod._refused.clear()
    yield
    copy_mod._refused.clear()


def recipe(family, ops, recipient="task", **extra):
    return {"inputs": {k: str(v) for k, v in family.items()}, "recipient": recipient, "operations": ops, **extra}


SWAP = [{"layer_swap": {"donor": "lang", "bottom": 2, "top": 1}}]


@pytest.mark.parametrize("methods", [("copy_file_range",), ("sendfile",), ("buffered",)])
def test_copy_range_each_method(tmp_path, methods):
    data = os.urandom(3_000_000)
    (tmp_path / "src").write_bytes(data)
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "wb") as dst:
        dst.write(b"x" * 100)
        dst.flush()
        try:
            used = copy_range(src.fileno(), dst.fileno(), 12345, 100, 2_000_000, methods=methods)
        except OSError as e:  # a kernel without the call: the test of that method does not apply
            pytest.skip(f"{methods[0]} unsupported here: {e}")
    assert used == methods[0]
    assert (tmp_path / "dst").read_bytes() == b"x" * 100 + data[12345:12345 + 2_000_000]


def test_copy_range_falls_back_when_refused(tmp_path, monkeypatch):
    data = os.urandom(100_000)
    (tmp_path / "src").write_bytes(data)

    def refuse(code):
        def f(*a, **k):
            raise OSError(code, os.strerror(code))
        return f

    monkeypatch.setattr(os, "copy_file_range", refuse(errno.EXDEV))
    monkeypatch.setattr(os, "sendfile", refuse(errno.ENOSYS))
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "wb") as dst:
        assert copy_range(src.fileno(), dst.fileno(), 10, 0, 50_000) == "buffered"
        assert copy_mod._refused == {"copy_file_range", "sendfile"}  # not tried again in this process
    assert (tmp_path / "dst").read_bytes() == data[10:50_010]


def test_copy_range_short_source_is_an_error(tmp_path):
    (tmp_path / "src").write_bytes(b"abc")
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "wb") as dst:
        with pytest.raises(OSError, match="ends early"):
            copy_range(src.fileno(), dst.fileno(), 0, 0, 10)


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))}


@pytest.mark.parametrize("methods", [copy_mod.METHODS, ("sendfile", "buffered"), ("buffered",)])
@pytest.mark.parametrize("shard_size", ["2GB", "30KB"])
def test_copied_output_is_byte_identical_to_computed(family, tmp_path, monkeypatch, methods, shard_size):
    r = recipe(family, SWAP + [{"take": {"from": "en", "select": {"names": ["model.norm.weight"]}}}],
               output={"shard_size": shard_size})
    monkeypatch.setattr(execute_mod, "copy_source", lambda e, inputs: None)  # every tensor through Python
    surgery.run(r, tmp_path / "computed")
    monkeypatch.undo()
    monkeypatch.setattr(copy_mod, "METHODS", methods)
    surgery.run(r, tmp_path / "copied")
    computed, copied = _shard_bytes(tmp_path / "computed"), _shard_bytes(tmp_path / "copied")
    assert (len(computed) > 1) == (shard_size == "30KB")
    assert copied == computed
    # and the values are the inputs' own bytes
    got, lang, task, en = load(tmp_path / "copied"), load(family["lang"]), load(family["task"]), load(family["en"])
    for name, t in got.items():
        want = en if name == "model.norm.weight" else lang if any(f".layers.{i}." in name for i in (0, 1, 7)) else task
        assert raw_bytes(t) == raw_bytes(want[name]), name


def test_adjacent_tensors_are_copied_in_one_call(family, tmp_path, monkeypatch):
    calls = []
    real = copy_mod.copy_range

    def spy(src, dst, src_off, dst_off, count, methods=None):
        calls.append(count)
        return real(src, dst, src_off, dst_off, count, methods)

    monkeypatch.setattr("surgery.io.writer.copy_range", spy)
    plan = surgery.build_plan(recipe(family, SWAP))
    surgery.run(plan.recipe, tmp_path / "out")
    # independent count: a new run starts where the source file changes or its byte ranges are not back to back
    runs, prev = 0, None
    for e in plan.entries:
        ck = plan.inputs[e.node.input]
        here = (ck.weight_map[e.node.name], *read_header(ck.weight_map[e.node.name]).offsets[e.node.name])
        if prev is None or here[0] != prev[0] or here[1] != prev[2]:
            runs += 1
        prev = here
    assert len(calls) == runs < len(plan.entries) // 4
    assert sum(calls) == plan.total_bytes


def test_dtype_change_and_math_still_computed(family, tmp_path):
    # output dtype differs from the stored one: nothing can be copied, values are converted
    surgery.run(recipe(family, SWAP, output={"dtype": "float32"}), tmp_path / "f32")
    got, lang = load(tmp_path / "f32"), load(family["lang"])
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], lang["model.layers.0.mlp.up_proj.weight"].float())


@pytest.mark.parametrize("via", ["api", "cli"])
def test_copy_only_plan_does_not_import_torch(family, tmp_path, via):
    path = tmp_path / "swap.json"
    path.write_text(json.dumps(recipe(family, SWAP)))
    run = ("surgery.run(json.load(open(sys.argv[1])), sys.argv[2])" if via == "api" else
           "from surgery.cli import cli; cli(['run', sys.argv[1], '-o', sys.argv[2], '-q', '--threads', '2'], "
           "standalone_mode=False)")
    code = (f"import sys, surgery, yaml, json; {run}; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'safetensors', 'transformers', 'mergekit', 'numpy') or m == 'huggingface_hub.hf_api'))")
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "out")], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(root)}, cwd=root)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    assert _shard_bytes(tmp_path / "out")  # and it wrote the checkpoint
    manifest = json.loads((tmp_path / "out" / "surgery_manifest.json").read_text())
    assert manifest["threads"] is None and manifest["torch"] == torch.__version__
    got, lang = load(tmp_path / "out"), load(family["lang"])
    assert torch.equal(got["model.layers.7.self_attn.q_proj.weight"], lang["model.layers.7.self_attn.q_proj.weight"])


def test_model_card_is_written_as_huggingface_hub_writes_it(family, tmp_path):
    from surgery.core.model_card import build_model_card

    plan = surgery.build_plan(recipe(family, SWAP))
    result = surgery.run(plan.recipe, tmp_path / "out")
    text = (result.output / "README.md").read_text()
    card = build_model_card(plan, (result.output / "surgery_recipe.yaml").read_text(), name="out")
    card.save(tmp_path / "hub.md")
    assert text == (tmp_path / "hub.md").read_text()
    assert text.startswith("---\nlibrary_name: transformers\ntags:\n- merge\n")
