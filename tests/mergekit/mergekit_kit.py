"""Helpers of the mergekit tests: tiny bf16 checkpoints, configs written from templates, mergekit-yaml's entry point
run in one subprocess, `surgery` in another, and a bitwise comparison of two outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from helpers import load, perturb, random_state, save_checkpoint, tiny_config

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[2]))
MK_ARGS = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"

DRIVER = """
import json, sys
from mergekit.scripts.run_yaml import main   # the mergekit-yaml command
for config, out, *args in json.loads(sys.argv[1]):
    main([config, out, *args], standalone_mode=False)
"""


def run_mergekit(jobs: list[tuple[Path, Path, list[str]]], mk_args: list[str] = MK_ARGS) -> None:
    """Run mergekit-yaml's entry point on every (config, out, args) in one process."""
    payload = json.dumps([[str(c), str(o), *mk_args, *a] for c, o, a in jobs])
    r = subprocess.run([sys.executable, "-c", DRIVER, payload], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


def surgery_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgery", *map(str, args)], env=ENV, capture_output=True,
                          text=True)


def make_models(root: Path, arch: str = "llama") -> dict[str, Path]:
    archs = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    cfg = tiny_config(arch, architectures=[archs[arch]])
    base = random_state(cfg, seed=0)
    states = {"base": base, "a": perturb(base, None, 0.02, seed=1), "b": perturb(base, None, 0.02, seed=2),
              "c": perturb(base, None, 0.02, seed=3)}
    return {n: save_checkpoint(root / n, s, cfg, dtype=torch.bfloat16) for n, s in states.items()}


def write_config(folder: Path, name: str, text: str, models: dict[str, Path]) -> Path:
    path = folder / f"{name}.yml"
    path.write_text(textwrap.dedent(text).format(**{k: str(v) for k, v in models.items()}))
    return path


def assert_same_checkpoint(mk: Path, ours: Path) -> None:
    a, b = load(mk), load(ours)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), f"{name}: max diff {(a[name].float() - b[name].float()).abs().max()}"
    assert_same_config(mk, ours)


def assert_same_config(mk: Path, ours: Path) -> None:
    ca = json.loads((mk / "config.json").read_text())
    cb = json.loads((ours / "config.json").read_text())
    ca.pop("transformers_version", None), cb.pop("transformers_version", None)
    assert ca == cb
