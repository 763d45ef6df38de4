"""The bad-input corpus: damaged checkpoints, indexes, recipes, adapters, outputs and numbers, made from a
real tiny checkpoint. Each case runs the CLI in-process and asserts the exact one-line message on stderr,
the exit code, and that the working folder (inputs, recipe, target and its parents) is byte-for-byte as
it was, and that nothing was added to the cache but hashes.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner
from corpus import copy_ckpt, first_tensor, make_good, patch_header, read_st, second_tensor, snapshot, write_st

from surgery.cli import cli
from surgery.io.safetensors import DTYPES

ST = "model.safetensors"
RECIPE = "inputs:\n  base: good\n  x: bad\nrecipient: base\n"                      # inputs.x is line 3
RECIPE_AD = "inputs:\n  base: good\n  ad: {adapter: lora, base: base}\nrecipient: base\n"
RECIPE_RUN = ("inputs:\n  base: good\n  x: bad\nrecipient: base\n"
              "operations:\n  - arithmetic: {expr: '0.5 * base + 0.5 * x'}\n")
MK = "merge_method: linear\nmodels:\n  - model: good\n    parameters: {weight: 0.5}\n" \
     "  - model: bad\n    parameters: {weight: 0.5}\ndtype: float32\n"


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


# ---------------------------------------------------------------------------- case builders

def _bad_file(w, make):
    copy_ckpt(w / "good", w / "bad")
    info = make(w / "bad" / ST)
    return info if isinstance(info, dict) else {}


def header(change):
    def setup(w):
        info = {}

        def wrapped(h):
            info.update(t0=first_tensor(h), t1=second_tensor(h), e0=h[first_tensor(h)]["data_offsets"][1],
                        e1=h[second_tensor(h)]["data_offsets"][1])
            change(h, info)  # in place

        _bad_file(w, lambda p: patch_header(p, wrapped))
        return info
    return setup


def raw_file(data: bytes):
    return lambda w: _bad_file(w, lambda p: p.write_bytes(data)) or {}


def raw_header(text: bytes, data: bytes = b""):
    return lambda w: _bad_file(w, lambda p: write_st(p, text, data)) or {}


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


F = "{w}/bad/model.safetensors"
I = "{w}/bad/model.safetensors.index.json"
PRE = "recipe.yaml:3: inputs.x: "
KNOWN = ", ".join(DTYPES)


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


# ---------------------------------------------------------------------------- everything else

def check(w, args, message, code=1, before=None):
    """Run the CLI in-process: exactly `error: message` on stderr, the exit code, and nothing changed."""
    before = snapshot(w) if before is None else before
    cache = Path(os.environ["SURGERY_CACHE"])
    cache_before = {p for p in snapshot(cache) if not p.startswith("sha256")} if cache.exists() else set()
    result = CliRunner().invoke(cli, args)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        f"traceback: {result.exc_info}"
    assert result.stderr == f"error: {message}\n"
    assert result.exit_code == code
    assert snapshot(w) == before
    after = {p for p in snapshot(cache) if not p.startswith("sha256")} if cache.exists() else set()
    assert after == cache_before  # no converted files or empty cache dirs left


def recipe(text, name="recipe.yaml"):
    def setup(w):
        (w / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def adapter_config(change):
    def setup(w):
        (w / "recipe.yaml").write_text(RECIPE_AD)
        path = w / "lora" / "adapter_config.json"
        cfg = json.loads(path.read_text())
        new = change(cfg)
        path.write_bytes(new if isinstance(new, bytes) else json.dumps(cfg if new is None else new).encode())
    return setup


def nan_input(value, tensor="model.embed_tokens.weight"):
    def setup(w):
        from safetensors.torch import load_file, save_file

        copy_ckpt(w / "good", w / "bad")
        state = load_file(str(w / "bad" / ST))
        state[tensor].view(-1)[0] = value
        save_file(state, str(w / "bad" / ST), metadata={"format": "pt"})
    return setup


def both(*setups):
    def setup(w):
        for s in setups:
            s(w)
    return setup


def loop(name):
    def setup(w):
        os.symlink(f"{name}-2", w / name)
        os.symlink(name, w / f"{name}-2")
    return setup


def make_pickle(w, payload, torch_save=False):
    (w / "bad").mkdir()
    shutil.copy(w / "good" / "config.json", w / "bad" / "config.json")
    if torch_save:
        import torch

        torch.save(payload, w / "bad" / "pytorch_model.bin")
        return
    with open(w / "bad" / "pytorch_model.bin", "wb") as f:
        pickle.dump(payload, f)


class Evil:
    def __reduce__(self):
        return (os.getcwd, ())


AD = "recipe.yaml:3: inputs.ad: {w}/lora/adapter_config.json: "
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
OUT_REFUSED = "{w}/good: the output would replace the input {w}/good; choose another output folder"

CASES = [
    # ---- file system
    ("input-symlink-loop", both(recipe(RECIPE), loop("bad")), ["validate", "recipe.yaml"],
     PRE + "bad: symlink loop at {w}/bad"),
    ("input-dangling-link", both(recipe(RECIPE), lambda w: os.symlink("nowhere", w / "bad")), ["validate", "recipe.yaml"],
     PRE + "bad: {w}/bad is a broken symlink (its target does not exist)"),
    ("recipe-symlink-loop", loop("r.yaml"), ["validate", "r.yaml"], "r.yaml: symlink loop at r.yaml"),
    ("recipe-not-utf8", recipe(b"inputs: {a: \xff}\n"), ["validate", "recipe.yaml"],
     "recipe.yaml: not UTF-8 text (byte 0xff at offset 12)"),
    ("recipe-too-large", recipe("# " + "x" * (5 << 20) + "\n"), ["validate", "recipe.yaml"],
     "recipe.yaml: 5242883 bytes; larger than the 4194304-byte limit"),
    ("output-under-a-file", both(recipe(RECIPE.replace("bad", "good2")), lambda w: (w / "afile").write_text("x")),
     ["run", "recipe.yaml", "-o", "afile/out"], "{w}/afile/out: cannot create the output: {w}/afile is a file, not a folder"),
    ("output-symlink-loop", both(recipe(RECIPE.replace("bad", "good2")), loop("o")), ["run", "recipe.yaml", "-o", "o"],
     "{w}/o: symlink loop at {w}/o"),
    ("config-not-json", both(recipe(RECIPE.replace("base: good", "base: bad")), lambda w: copy_ckpt(w / "good", w / "bad"),
                             lambda w: (w / "bad" / "config.json").write_text("{")),
     ["validate", "recipe.yaml"], "{w}/bad/config.json: not a valid config (Expecting property name enclosed in double "
                                  "quotes: line 1 column 2 (char 1))"),
    ("config-list", both(recipe(RECIPE.replace("base: good", "base: bad")), lambda w: copy_ckpt(w / "good", w / "bad"),
                         lambda w: (w / "bad" / "config.json").write_text("[]")),
     ["validate", "recipe.yaml"], "{w}/bad/config.json: not a valid config (a JSON list, not an object)"),
    # ---- output safety
    ("output-is-input", recipe(RECIPE.replace("bad", "good2")), ["run", "recipe.yaml", "-o", "good"], OUT_REFUSED),
    ("output-is-input-force", recipe(RECIPE.replace("bad", "good2")), ["run", "recipe.yaml", "-o", "good", "--force"],
     OUT_REFUSED),
    ("output-inside-input", recipe(RECIPE.replace("bad", "good2")), ["run", "recipe.yaml", "-o", "good/sub", "--force"],
     "{w}/good/sub: the output is inside the input {w}/good; choose a folder outside it"),
    ("output-dot-force", recipe(RECIPE.replace("bad", "good2")), ["run", "recipe.yaml", "-o", ".", "--force"],
     "{w}: the output would replace the input {w}/recipe.yaml; choose another output folder"),
    ("output-contains-input", both(recipe(RECIPE.replace("good2", "sub/good2").replace("bad", "sub/good2")),
                                   lambda w: shutil.move(w / "good2", w / "sub" / "good2") if (w / "sub").mkdir() is None
                                   else None),
     ["run", "recipe.yaml", "-o", "sub", "--force"],
     "{w}/sub: the output would replace the input {w}/sub/good2; choose another output folder"),
    ("force-arbitrary-dir", both(recipe(RECIPE.replace("bad", "good2")),
                                 lambda w: (w / "stuff").mkdir() or (w / "stuff" / "notes.txt").write_text("mine")),
     ["run", "recipe.yaml", "-o", "stuff", "--force"],
     "{w}/stuff: --force replaces only a previous surgery output, and this directory is not one (no "
     "surgery_manifest.json or .surgery-output); remove it yourself or choose another"),
    ("existing-no-force", both(recipe(RECIPE.replace("bad", "good2")), lambda w: (w / "stuff").mkdir()),
     ["run", "recipe.yaml", "-o", "stuff"], "output directory {w}/stuff already exists; pass --force to replace it"),
    ("extract-over-base", lambda w: None, ["extract-lora", "good", "good2", "-o", "good", "--force", "--rank", "2"],
     OUT_REFUSED),
    ("extract-inside-tuned", lambda w: None, ["extract-lora", "good", "good2", "-o", "good2/lora", "--rank", "2"],
     "{w}/good2/lora: the output is inside the input {w}/good2; choose a folder outside it"),
    ("adamergex-over-task", lambda w: None, ["adamergex", "lora", "lora", "lora", "-o", "lora", "--force"],
     "{w}/lora: the output would replace the input {w}/lora; choose another output folder"),
    ("mergekit-over-model", recipe(MK.replace("bad", "good2"), "mk.yml"),
     ["mergekit", "mk.yml", "good", "--force", "--no-copy-tokenizer"],
     "{w}/good: the output would replace the input {w}/good; choose another output folder"),
    ("mergekit-dot", recipe(MK.replace("bad", "good2"), "mk.yml"), ["mergekit", "mk.yml", ".", "--force"],
     "{w}: the output would replace the input {w}/good; choose another output folder"),
    ("demo-over-a-folder", lambda w: None, ["demo", "--dir", "good"],
     "{w}/good: already exists and is not a previous demo folder; choose another --dir"),
    # ---- recipes
    ("yaml-python-tag", recipe("inputs: !!python/object/apply:os.system ['echo hi']\n"), ["validate", "recipe.yaml"],
     "recipe.yaml:1: unsupported YAML tag '!!python/object/apply:os.system'; recipes are plain YAML"),
    ("yaml-python-name", recipe("inputs:\n  a: !!python/name:os.system good\n"), ["validate", "recipe.yaml"],
     "recipe.yaml:2: unsupported YAML tag '!!python/name:os.system'; recipes are plain YAML"),
    ("yaml-custom-tag", recipe("inputs:\n  a: !model good\n"), ["validate", "recipe.yaml"],
     "recipe.yaml:2: unsupported YAML tag '!model'; recipes are plain YAML"),
    ("yaml-tag-on-key", recipe("inputs:\n  !!python/str a: good\n"), ["validate", "recipe.yaml"],
     "recipe.yaml:2: unsupported YAML tag '!!python/str'; recipes are plain YAML"),
    ("yaml-alias-bomb", recipe(BOMB), ["validate", "recipe.yaml"],
     "recipe.yaml:1: YAML aliases expand to more than 100000 nodes; refused (an alias bomb?)"),
    ("yaml-deep-nesting", recipe("a: " + "[" * 60 + "]" * 60 + "\n"), ["validate", "recipe.yaml"],
     "recipe.yaml:1: YAML nested deeper than 50 levels"),
    ("yaml-very-deep-nesting", recipe("a: " + "[" * 5000 + "]" * 5000 + "\n"), ["validate", "recipe.yaml"],
     "recipe.yaml: YAML nested deeper than 50 levels"),
    ("yaml-complex-key", recipe("? [a, b]\n: 1\n"), ["validate", "recipe.yaml"],
     "recipe.yaml:1: a mapping key must be a plain value, not a list or mapping"),
    ("yaml-control-char", recipe("inputs: {a: good}\x07\n"), ["validate", "recipe.yaml"],
     "recipe.yaml: invalid YAML: unacceptable character #x0007: special characters are not allowed"),
    ("regex-names", recipe(RECIPE.replace("bad", "good2") + "operations:\n  - arithmetic:\n      expr: base - x\n"
                           "      select: {names: ['re:[']}\n"), ["validate", "recipe.yaml"],
     "recipe.yaml:8: operations.0.arithmetic.select.names: invalid regex '[': unterminated character set at "
     "position 0 (got ['re:['])"),
    ("regex-exclude", recipe(RECIPE.replace("bad", "good2") + "operations:\n  - arithmetic:\n      expr: base - x\n"
                             "      select: {exclude: ['*.mlp.*', 're:(a']}\n"), ["validate", "recipe.yaml"],
     "recipe.yaml:8: operations.0.arithmetic.select.exclude: invalid regex '(a': missing ), unterminated subpattern "
     "at position 0 (got ['*.mlp.*', 're:(a'])"),
    # ---- adapters (as recipe inputs; adamergex below)
    ("adapter-config-list", adapter_config(lambda c: [c]), ["validate", "recipe.yaml"],
     AD + "a JSON list, not an object"),
    ("adapter-r-string", adapter_config(lambda c: c.update(r="two")), ["validate", "recipe.yaml"],
     AD + "r: expected a positive integer, got 'two'"),
    ("adapter-r-zero", adapter_config(lambda c: c.update(r=0)), ["validate", "recipe.yaml"],
     AD + "r: expected a positive integer, got 0"),
    ("adapter-r-bool", adapter_config(lambda c: c.update(r=True)), ["validate", "recipe.yaml"],
     AD + "r: expected a positive integer, got True"),
    ("adapter-alpha-string", adapter_config(lambda c: c.update(lora_alpha="x")), ["validate", "recipe.yaml"],
     AD + "lora_alpha: expected a number, got 'x'"),
    ("adapter-rank-pattern-list", adapter_config(lambda c: c.update(rank_pattern=[1])), ["validate", "recipe.yaml"],
     AD + "rank_pattern: expected a mapping of module pattern to a positive integer, got [1]"),
    ("adapter-rank-pattern-value", adapter_config(lambda c: c.update(rank_pattern={"q_proj": "x"})),
     ["validate", "recipe.yaml"], AD + "rank_pattern: expected a mapping of module pattern to a positive integer, "
                                       "got {{'q_proj': 'x'}}"),
    ("adapter-rank-pattern-regex", adapter_config(lambda c: c.update(rank_pattern={"[": 2})),
     ["validate", "recipe.yaml"], AD + "rank_pattern: invalid regex '[': unterminated character set at position 0"),
    ("adapter-alpha-pattern-regex", adapter_config(lambda c: c.update(alpha_pattern={"(q": 2})),
     ["validate", "recipe.yaml"], AD + "alpha_pattern: invalid regex '(q': missing ), unterminated subpattern at "
                                       "position 0"),
    ("adapter-target-regex", adapter_config(lambda c: c.update(target_modules="*proj")),
     ["validate", "recipe.yaml"], AD + "target_modules: invalid regex '*proj': nothing to repeat at position 0"),
    ("adapter-target-number", adapter_config(lambda c: c.update(target_modules=5)), ["validate", "recipe.yaml"],
     AD + "target_modules: expected a list of module names or a regex string, got 5"),
    ("adapter-fifo-string", adapter_config(lambda c: c.update(fan_in_fan_out="yes")), ["validate", "recipe.yaml"],
     AD + "fan_in_fan_out: expected true or false, got 'yes'"),
    ("adapter-layers-string", adapter_config(lambda c: c.update(layers_to_transform="0")), ["validate", "recipe.yaml"],
     AD + "layers_to_transform: expected an integer or a list of integers, got '0'"),
    ("adapter-config-not-json", adapter_config(lambda c: b"{"), ["validate", "recipe.yaml"],
     AD + "invalid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("adapter-config-not-utf8", adapter_config(lambda c: b'{"r": "\xff"}'), ["validate", "recipe.yaml"],
     AD + "invalid JSON: 'utf-8' codec can't decode byte 0xff in position 7: invalid start byte"),
    ("adapter-symlink-loop", both(recipe(RECIPE_AD.replace("adapter: lora", "adapter: ad")), loop("ad")),
     ["validate", "recipe.yaml"], "recipe.yaml:3: inputs.ad: ad: symlink loop at {w}/ad"),
    ("adamergex-config-list", adapter_config(lambda c: [c]), ["adamergex", "lora", "lora", "lora", "-o", "out"],
     "lora/adapter_config.json: a JSON list, not an object"),
    ("adamergex-r-string", adapter_config(lambda c: c.update(r="two")), ["adamergex", "lora", "lora", "lora", "-o", "o"],
     "lora/adapter_config.json: r: expected a positive integer, got 'two'"),
    # ---- numbers
    ("nan-input-run", both(recipe(RECIPE_RUN), nan_input(float("nan"))), ["run", "recipe.yaml", "-o", "new/deeper/out"],
     "tensor 'model.embed_tokens.weight': 1 non-finite values (NaN/Inf) in the output; the inputs hold them: "
     "1 in bad:model.embed_tokens.weight; pass --allow-nonfinite to write them anyway"),
    ("inf-input-run", both(recipe(RECIPE_RUN), nan_input(float("inf"))), ["run", "recipe.yaml", "-o", "new/out"],
     "tensor 'model.embed_tokens.weight': 1 non-finite values (NaN/Inf) in the output; the inputs hold them: "
     "1 in bad:model.embed_tokens.weight; pass --allow-nonfinite to write them anyway"),
    ("float16-overflow-run", recipe(RECIPE.replace("bad", "good2") + "output: {dtype: float16}\noperations:\n"
                                    "  - arithmetic: {expr: 'base * 1e9', select: {names: ['lm_head.weight']}}\n"),
     ["run", "recipe.yaml", "-o", "new/out"], "tensor 'lm_head.weight': {n16} values exceed the F16 range (|x| > 65504) "
                                              "and would be written as Inf; use a wider output dtype, or pass "
                                              "--allow-nonfinite to write them anyway"),
    ("nan-extract-lora", nan_input(float("nan"), "model.layers.0.self_attn.q_proj.weight"),
     ["extract-lora", "good", "bad", "-o", "new/lora", "--rank", "2"],
     "bad: tensor 'model.layers.0.self_attn.q_proj.weight' holds 1 non-finite values (NaN/Inf); a LoRA cannot be "
     "extracted from it"),
    ("nan-diff-expert", nan_input(float("nan"), "model.layers.0.mlp.up_proj.weight"), ["diff", "good", "bad"],
     "bad: tensor 'model.layers.0.mlp.up_proj.weight' holds 1 non-finite values (NaN/Inf); statistics over it "
     "would be meaningless"),
    ("inf-diff-base", nan_input(float("-inf"), "model.norm.weight"), ["diff", "bad", "good"],
     "bad: tensor 'model.norm.weight' holds 1 non-finite values (NaN/Inf); statistics over it would be meaningless"),
    # ---- mergekit
    ("mergekit-pickle", both(recipe(MK, "mk.yml"), lambda w: make_pickle(w, {})),
     ["mergekit", "mk.yml", "out", "--no-copy-tokenizer"],
     "mk.yml: model 'bad': only pickle .bin weights found; `surgery mergekit` never loads pickles (they can run "
     "code): run the config with `surgery run CONFIG -o OUT --convert-bin`, or convert the model to safetensors first"),
    ("mergekit-no-tokenizer", recipe("base_model: good\n" + MK.replace("bad", "good2"), "mk.yml"),
     ["mergekit", "mk.yml", "out"],
     "mk.yml: model 'good' has no tokenizer files to copy; add them, or pass --no-copy-tokenizer"),
    ("mergekit-bad-header", both(recipe(MK, "mk.yml"), raw_header(b"[]")),
     ["mergekit", "mk.yml", "out", "--no-copy-tokenizer"],
     "mk.yml: model 'bad': {w}/bad/model.safetensors: invalid safetensors header: a JSON list, not an object"),
    ("mergekit-python-tag", recipe("merge_method: !!python/object/apply:os.system ['echo hi']\n", "mk.yml"),
     ["mergekit", "mk.yml", "out"], "mk.yml:1: unsupported YAML tag '!!python/object/apply:os.system'; recipes are "
                                    "plain YAML"),
    ("mergekit-config-loop", loop("mk.yml"), ["mergekit", "mk.yml", "out"], "mk.yml: symlink loop at mk.yml"),
    # ---- messages
    ("convert-bin-evil-pickle", both(recipe(RECIPE), lambda w: make_pickle(w, {"w": Evil()})),
     ["validate", "recipe.yaml", "--convert-bin"],
     PRE + "{w}/bad/pytorch_model.bin: cannot load with weights_only=True: not a file the safe loader can read "
           "(Unsupported operand 149)"),
    ("convert-bin-evil-torch-save", both(recipe(RECIPE), lambda w: make_pickle(w, {"w": Evil()}, torch_save=True)),
     ["validate", "recipe.yaml", "--convert-bin"],
     PRE + "{w}/bad/pytorch_model.bin: cannot load with weights_only=True: it holds objects other than tensors "
           "(posix.getcwd); refused: unpickling them could run code"),
    ("convert-bin-raw-pickle", both(recipe(RECIPE), lambda w: make_pickle(w, [1, 2])),
     ["validate", "recipe.yaml", "--convert-bin"],
     PRE + "{w}/bad/pytorch_model.bin: cannot load with weights_only=True: not a file the safe loader can read "
           "(Unsupported operand 149)"),
    ("convert-bin-not-a-dict", both(recipe(RECIPE), lambda w: make_pickle(w, [1, 2], torch_save=True)),
     ["validate", "recipe.yaml", "--convert-bin"], PRE + "{w}/bad/pytorch_model.bin: not a state dict (a pickled list)"),
    ("pickle-without-flag", both(recipe(RECIPE), lambda w: make_pickle(w, {})), ["validate", "recipe.yaml"],
     PRE + "bad: only pickle .bin weights found (pytorch_model.bin). Pickle files can run code when loaded, so they "
           "are refused. Pass --convert-bin to convert them once with torch.load(weights_only=True) into safetensors."),
]


@pytest.mark.parametrize("name,setup,args,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(work, name, setup, args, message):
    setup(work)
    n16 = None
    if "{n16}" in message:  # the float16 overflow case's count, computed here in float32 as the run does
        from safetensors.torch import load_file

        n16 = int(((load_file(str(work / "good" / ST))["lm_head.weight"].float() * 1e9).abs() > 65504).sum())
    check(work, args, message.format(w=work, n16=n16))


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
    assert len(INPUT_CASES) + len(CASES) + 3 >= 100


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
