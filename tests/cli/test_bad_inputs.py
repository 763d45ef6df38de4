"""The bad-input corpus, damaged checkpoints and indexes (paths and outputs: test_bad_paths.py; recipes,
adapters, numbers, mergekit and pickles: test_bad_recipes.py), made from a real tiny checkpoint. Each case
runs the CLI in-process and asserts the exact one-line message on stderr, the exit code, and that the working
folder (inputs, recipe, target and its parents) is byte-for-byte as it was, and that nothing was added to the
cache but hashes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from bad_input_kit import (F, I, KNOWN, PRE, RECIPE, RECIPE_AD, RECIPE_RUN, _bad_file, check, header, nan_input,
                           raw_file, raw_header)
from click.testing import CliRunner
from corpus import first_tensor, patch_header, read_st, second_tensor, snapshot, write_st

from surgery.cli import cli


def resize(delta: int):
    def setup(w):
        def change(p):
            raw = p.read_bytes()
            h, data = read_st(p)
            p.write_bytes(raw[:len(raw) + delta] if delta < 0 else raw + b"\0" * delta)
            return {"d": len(data), "have": len(data) + delta}
        return _bad_file(w, change)
    return setup


def terabytes(w):
    def change(p):
        write_st(p, {"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}}, b"\0" * 1024)
    _bad_file(w, change)
    return {}


def dup_key(w):
    def change(p):
        h, data = read_st(p)
        t0 = first_tensor(h)
        text = json.dumps(h)
        entry = json.dumps({t0: h[t0]})[1:-1]
        write_st(p, ("{" + entry + ", " + text[1:]).encode(), data)
        return {"t0": t0}
    return _bad_file(w, change)


def sharded(change):
    def setup(w):
        shutil.copytree(w / "sharded", w / "bad")
        index = w / "bad" / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        out = change(w / "bad", data) or {}
        if "index" not in out:
            index.write_text(json.dumps(data))
        return out
    return setup


S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _first_in(data, shard):
    return sorted(n for n, s in data["weight_map"].items() if s == shard)[0]


def idx_raw(text):
    def change(d, data):
        (d / "model.safetensors.index.json").write_text(text)
        return {"index": 1}
    return change


def idx_swap(d, data):
    n = _first_in(data, S1)
    data["weight_map"][n] = S2
    return {"n": n}


def idx_dup(d, data):
    from safetensors.torch import load_file, save_file

    n = _first_in(data, S1)
    both = {**load_file(str(d / S2)), n: load_file(str(d / S1))[n]}
    save_file(both, str(d / S2))
    return {"n": n}


def idx_missing_shard(d, data):
    (d / S2).unlink()


def idx_map(key, value):
    def change(d, data):
        data["weight_map"][key] = value
    return change



def _set(key, value, which="t0"):
    def change(h, i):
        h[i[which]][key] = value
    return change


HEADER_CASES = [
    ("too-short", raw_file(b"abc"), F + ": not a safetensors file (too short)"),
    ("header-past-end", raw_file(struct.pack("<Q", 10**6) + b"{}"),
     F + ": not a safetensors file (header length 1000000, file size 10)"),
    ("header-not-json", raw_header(b"{nope"), F + ": not a safetensors file (header is not JSON: Expecting property "
                                               "name enclosed in double quotes: line 1 column 2 (char 1))"),
    ("header-list", raw_header(b"[]"), F + ": invalid safetensors header: a JSON list, not an object"),
    ("header-string", raw_header(b'"x"'), F + ": invalid safetensors header: a JSON str, not an object"),
    ("header-not-utf8", raw_header(b'{"\xff": 1}'), F + ": not a safetensors file (header is not JSON: 'utf-8' codec "
                                                    "can't decode byte 0xff in position 2: invalid start byte)"),
    ("no-dtype", header(lambda h, i: h[i["t0"]].pop("dtype")), F + ": tensor '{t0}': header entry has no 'dtype'"),
    ("no-shape", header(lambda h, i: h[i["t0"]].pop("shape")), F + ": tensor '{t0}': header entry has no 'shape'"),
    ("no-offsets", header(lambda h, i: h[i["t0"]].pop("data_offsets")),
     F + ": tensor '{t0}': header entry has no 'data_offsets'"),
    ("unknown-dtype", header(_set("dtype", "F17")), F + ": tensor '{t0}': unknown dtype 'F17' (known: " + KNOWN + ")"),
    ("dtype-number", header(_set("dtype", 4)), F + ": tensor '{t0}': unknown dtype 4 (known: " + KNOWN + ")"),
    ("entry-list", header(lambda h, i: h.__setitem__(i["t0"], [])),
     F + ": tensor '{t0}': header entry is a JSON list, not an object"),
    ("shape-negative", header(_set("shape", [-1, 32])),
     F + ": tensor '{t0}': shape [-1, 32] is not a list of non-negative integers"),
    ("shape-string", header(_set("shape", "32")), F + ": tensor '{t0}': shape '32' is not a list of non-negative integers"),
    ("shape-float", header(_set("shape", [2.5])), F + ": tensor '{t0}': shape [2.5] is not a list of non-negative integers"),
    ("offsets-negative", header(lambda h, i: h[i["t0"]].__setitem__("data_offsets", [-4, i["e0"]])),
     F + ": tensor '{t0}': data_offsets [-4, {e0}] are not [start, end] with 0 <= start <= end"),
    ("offsets-reversed", header(lambda h, i: h[i["t0"]].__setitem__("data_offsets", [i["e0"], 0])),
     F + ": tensor '{t0}': data_offsets [{e0}, 0] are not [start, end] with 0 <= start <= end"),
    ("offsets-three", header(_set("data_offsets", [0, 1, 2])),
     F + ": tensor '{t0}': data_offsets [0, 1, 2] are not [start, end] with 0 <= start <= end"),
    ("offsets-overlap", header(lambda h, i: h.__setitem__(i["t1"], dict(h[i["t0"]])) or i.update(
        late=max(i["t0"], i["t1"]))), F + ": tensor '{late}': data_offsets [0, {e0}] overlaps the tensor before it"),
    ("offsets-gap", header(lambda h, i: h.pop(i["t0"])),
     F + ": tensor '{t1}': data_offsets [{e0}, {e1}] leaves a gap of {e0} bytes before it"),
    ("shape-vs-offsets", header(lambda h, i: h[i["t0"]].__setitem__("shape", [2 * h[i["t0"]]["shape"][0]]
                                                                        + h[i["t0"]]["shape"][1:]) or i.update(
        shape=h[i["t0"]]["shape"], nb=2 * i["e0"])),
     F + ": tensor '{t0}': shape {shape} of F32 is {nb} bytes but data_offsets [0, {e0}] span {e0}"),
    ("metadata-not-strings", header(lambda h, i: h.__setitem__("__metadata__", {"format": 1})),
     F + ": invalid safetensors header: __metadata__ must map strings to strings"),
    ("terabyte-tensor", terabytes, F + ": the header describes 4398046511104 bytes of tensor data but the file holds "
                                       "1024 (truncated or padded file)"),
    ("truncated", resize(-100), F + ": the header describes {d} bytes of tensor data but the file holds {have} "
                                    "(truncated or padded file)"),
    ("padded", resize(16), F + ": the header describes {d} bytes of tensor data but the file holds {have} "
                               "(truncated or padded file)"),
    ("duplicate-tensor-key", dup_key, F + ": not a safetensors file (header is not JSON: duplicate key '{t0}')"),
]

INDEX_CASES = [
    ("index-map-list", sharded(lambda d, data: data.__setitem__("weight_map", [])),
     I + ": not a valid safetensors index (weight_map must be a mapping of tensor name to shard file)"),
    ("index-no-map", sharded(lambda d, data: data.pop("weight_map")),
     I + ": not a valid safetensors index (weight_map must be a mapping of tensor name to shard file)"),
    ("index-is-list", sharded(idx_raw("[1, 2]")),
     I + ": not a valid safetensors index (weight_map must be a mapping of tensor name to shard file)"),
    ("index-not-json", sharded(idx_raw("{oops")), I + ": not a valid safetensors index (not JSON: Expecting property "
                                                    "name enclosed in double quotes: line 1 column 2 (char 1))"),
    ("index-ghost-tensor", sharded(idx_map("model.ghost.weight", S1)),
     I + f": tensor 'model.ghost.weight' is indexed in shard {S1} but no shard holds it"),
    ("index-wrong-shard", sharded(idx_swap), I + ": tensor '{n}' is indexed in shard " + S2 + " but is in " + S1),
    ("index-missing-shard", sharded(idx_missing_shard), I + f": index lists shard(s) that are missing: {S2}"),
    ("index-shard-path", sharded(idx_map("model.norm.weight", "../x.safetensors")),
     I + ": tensor 'model.norm.weight': shard '../x.safetensors' is not a file name in the folder"),
    ("index-shard-number", sharded(idx_map("model.norm.weight", 5)),
     I + ": tensor 'model.norm.weight': shard 5 is not a file name in the folder"),
    ("index-tensor-twice", sharded(idx_dup), "{w}/bad/" + S2 + ": tensor '{n}' is also in " + S1),
]

INPUT_CASES = [(f"{kind}-{cmd}", setup, msg, cmd) for kind, setup, msg in HEADER_CASES + INDEX_CASES
               for cmd in ("validate", "run")]


@pytest.mark.parametrize("name,setup,message,cmd", INPUT_CASES, ids=[c[0] for c in INPUT_CASES])
def test_damaged_checkpoint(work, assets, name, setup, message, cmd):
    (work / "recipe.yaml").write_text(RECIPE)
    info = setup(work)
    args = ["validate", "recipe.yaml"] if cmd == "validate" else ["run", "recipe.yaml", "-o", "new/deeper/out"]
    check(work, args, PRE + message.format(w=work, **info))



def test_overlapping_adapter_weights_and_overflow(work):
    patch_header(work / "lora" / "adapter_model.safetensors",
                 lambda h: h.__setitem__(second_tensor(h), dict(h[first_tensor(h)])))
    h, _ = read_st(work / "lora" / "adapter_model.safetensors")
    late = max(first_tensor(h), second_tensor(h))
    (work / "recipe.yaml").write_text(RECIPE_AD)
    end = h[late]["data_offsets"][1]
    check(work, ["validate", "recipe.yaml"], f"recipe.yaml:3: inputs.ad: {work}/lora/adapter_model.safetensors: "
                                             f"tensor {late!r}: data_offsets [0, {end}] overlaps the tensor before it")
    (work / "r2.yaml").write_text(RECIPE.replace("bad", "good2")
                                  + "operations:\n  - arithmetic: {expr: 'base * 1e38 * 1e10'}\n")
    result = CliRunner().invoke(cli, ["run", "r2.yaml", "-o", "new/out"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "non-finite values (NaN/Inf) in the output; the inputs are finite, so the operation produced them " \
           "(overflow?); pass --allow-nonfinite to write them anyway" in result.stderr
    assert not (work / "new").exists()


def test_lock_held_by_another_process(work):
    import fcntl

    (work / "recipe.yaml").write_text(RECIPE.replace("bad", "good2"))
    (work / "new").mkdir()
    lock = work / "new" / ".out.surgery-lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        check(work, ["run", "recipe.yaml", "-o", "new/out"],
              f"{work}/new/out: another surgery process is writing this output now (lock .out.surgery-lock); "
              "wait for it or choose another output")
    finally:
        os.close(fd)


def test_allow_nonfinite_writes_them(work):
    import math

    from helpers import load

    (work / "recipe.yaml").write_text(RECIPE_RUN)
    nan_input(float("nan"))(work)
    result = CliRunner().invoke(cli, ["run", "recipe.yaml", "-o", "out", "--allow-nonfinite", "-q"])
    assert result.exit_code == 0, result.stderr
    assert math.isnan(float(load(work / "out")["model.embed_tokens.weight"][0, 0]))


def test_count_of_corpus_cases():
    from test_bad_paths import CASES as PATHS
    from test_bad_recipes import CASES as RECIPES

    assert len(INPUT_CASES) + len(PATHS) + len(RECIPES) + 3 >= 100


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs sysfs, where creating files is denied even to root")
def test_permission_denied_on_the_output_folder(work):
    (work / "recipe.yaml").write_text(RECIPE.replace("bad", "good2"))
    check(work, ["run", "recipe.yaml", "-o", "/sys/surgery-out"],
          "/sys/surgery-out: cannot create the output: Permission denied")


@pytest.mark.parametrize("args,message", [
    (["validate", "recipe.yaml"], PRE + "{w}/bad/model.safetensors: invalid safetensors header: a JSON list, not an object"),
    (["run", "recipe.yaml", "-o", "new/out"], PRE + "{w}/bad/model.safetensors: invalid safetensors header: a JSON "
                                                    "list, not an object"),
])
def test_real_process_prints_one_line(work, args, message):
    """The same promise from `python -m surgery` in a real process (warnings, logging and all)."""
    import subprocess
    import sys

    (work / "recipe.yaml").write_text(RECIPE)
    raw_header(b"[]")(work)
    before = snapshot(work)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    p = subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True, cwd=work, env=env)
    assert (p.returncode, p.stdout, p.stderr) == (1, "", f"error: {message.format(w=work)}\n")
    assert snapshot(work) == before
