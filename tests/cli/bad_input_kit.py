"""The bad-input corpus's machinery (tests/cli/test_bad_*.py): recipes naming a damaged input, builders that
damage a copy of the good checkpoint, and `check`, which runs the CLI in-process and asserts the one-line
message, the exit code, and that nothing changed.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

from click.testing import CliRunner
from corpus import copy_ckpt, first_tensor, patch_header, second_tensor, snapshot, write_st

from surgery.cli import cli
from surgery.io.safetensors import DTYPES

ST = "model.safetensors"
RECIPE = "inputs:\n  base: good\n  x: bad\nrecipient: base\n"                      # inputs.x is line 3
RECIPE_AD = "inputs:\n  base: good\n  ad: {adapter: lora, base: base}\nrecipient: base\n"
RECIPE_RUN = ("inputs:\n  base: good\n  x: bad\nrecipient: base\n"
              "operations:\n  - arithmetic: {expr: '0.5 * base + 0.5 * x'}\n")
MK = "merge_method: linear\nmodels:\n  - model: good\n    parameters: {weight: 0.5}\n" \
     "  - model: bad\n    parameters: {weight: 0.5}\ndtype: float32\n"

F = "{w}/bad/model.safetensors"
I = "{w}/bad/model.safetensors.index.json"
PRE = "recipe.yaml:3: inputs.x: "
KNOWN = ", ".join(DTYPES)


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
