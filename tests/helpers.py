"""Tiny checkpoints for tests: transformers configs with random weights, saved as safetensors."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=8, num_attention_heads=4, vocab_size=128)


def tiny_config(arch: str = "llama", **overrides):
    import transformers as tf

    if arch == "llama":
        cfg = tf.LlamaConfig(**TINY, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**TINY, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(**TINY, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                  sliding_window=16)
    elif arch == "phi3":
        cfg = tf.Phi3Config(**TINY, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0,
                            tie_word_embeddings=False)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=8, n_head=4, vocab_size=128, n_positions=64)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(**TINY, max_position_embeddings=64)
    elif arch == "bert":
        cfg = tf.BertConfig(**TINY, max_position_embeddings=64)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def random_state(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cls = AutoModel if cfg.model_type == "bert" else AutoModelForCausalLM
    model = cls.from_config(cfg)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(path, state: dict, cfg, dtype=torch.float32, shard_names: list[list[str]] | None = None) -> Path:
    """Write config.json + model.safetensors (or shards with an index when shard_names is given)."""
    import json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    state = {k: v.to(dtype).contiguous() if v.is_floating_point() else v for k, v in state.items()}
    if not shard_names:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, names in enumerate(shard_names):
            fname = f"model-{i + 1:05d}-of-{len(shard_names):05d}.safetensors"
            save_file({n: state[n] for n in names}, str(path / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in names})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def perturb(state: dict, layers=None, scale: float = 0.1, seed: int = 1, names: str | None = None) -> dict:
    """A copy of state with noise added to tensors of the given layers (None: all tensors)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        m = re.search(r"\.(\d+)\.", k)
        hit = (layers is None or (m is not None and int(m[1]) in layers)) and (names is None or re.search(names, k))
        if hit and v.is_floating_point():
            out[k] = v + scale * torch.randn(v.shape, generator=gen)
        else:
            out[k] = v.clone()
    return out


def load(path) -> dict[str, torch.Tensor]:
    """All tensors of an output directory (single file or shards)."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tied_config(arch: str = "llama", **overrides):
    """A tiny config shaped like SmolLM2: tied embeddings and grouped-query attention (2 kv heads for 4)."""
    cfg = tiny_config(arch, tie_word_embeddings=True, **overrides)
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    return cfg


def tied_state(cfg, seed: int = 0) -> dict:
    """Random weights of a tied model as save_pretrained writes them: without lm_head.weight."""
    return {k: v for k, v in random_state(cfg, seed).items() if k != "lm_head.weight"}


def run_cli(*args, cwd=None, env: dict | None = None):
    """`surgery ARGS...` in this process (click's CliRunner), as a subprocess would report it:
    ``returncode``, ``stdout``, ``stderr``. An exception the CLI does not turn into a one-line error
    gives exit code 1 and its traceback on stderr, as the process would print it."""
    import os
    import traceback
    from types import SimpleNamespace

    from click.testing import CliRunner

    from surgery.cli import cli

    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        res = CliRunner().invoke(cli, [str(a) for a in args], env=env, prog_name="surgery")
    finally:
        os.chdir(old)
    stderr = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        stderr += "".join(traceback.format_exception(res.exception))
    return SimpleNamespace(returncode=res.exit_code, stdout=res.stdout, stderr=stderr)


# run `python -m surgery ARGS...` as the console does, then report what the process imported and built
PROBE = """
import json, runpy, sys
args = json.loads(sys.argv[1])
sys.argv = ["surgery", *args]
try:
    runpy.run_module("surgery", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert not e.code, e.code
from surgery.operations import OPERATIONS
from surgery.merge.settings import Condition
built = sorted(n for n, m in OPERATIONS.items() if m.__pydantic_complete__)
print(json.dumps({"modules": sorted(sys.modules), "built": built, "condition": Condition.__pydantic_complete__}))
"""


def probe(*args) -> dict:
    """`surgery ARGS...` in a fresh process: ``modules`` it imported, recipe models ``built``, ``condition``."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", PROBE, json.dumps([str(a) for a in args])], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(root)}, cwd=root)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def use_implementation(name: str, monkeypatch, kernel: str) -> None:
    """Select the compiled kernels ('native') or the numpy code ('numpy') for a test; a kernel that is not built
    fails the test where a C compiler exists (and skips it where none does)."""
    import shutil

    import pytest

    from surgery.merge import native

    if name == "numpy":
        monkeypatch.setenv("SURGERY_BACKEND", "numpy")
        return
    monkeypatch.delenv("SURGERY_BACKEND", raising=False)
    if native.load(kernel) is None:
        if shutil.which("cc"):
            pytest.fail(f"the compiled kernel surgery/merge/{kernel}.c is not built: run "
                        "`python setup.py build_ext --inplace` (or `pip install -e .`)")
        pytest.skip("no C compiler: the compiled kernels cannot be built here")


def with_nan(source: Path, folder: Path, name: str, index) -> Path:
    """A copy of checkpoint ``source`` (bfloat16) whose tensor ``name`` holds NaN at ``index``."""
    state = load(source)
    state[name] = state[name].clone()
    state[name][index] = float("nan")
    return save_checkpoint(folder, state, tiny_config("llama"), dtype=torch.bfloat16)


def errors_numpy_and_torch(recipe, folder: Path, monkeypatch) -> list[str]:
    """The SurgeryError messages of one recipe run on the numpy path, then on the torch path (--backend torch)."""
    import pytest

    import surgery

    errors = []
    for flag in ("auto", "torch"):
        monkeypatch.setenv("SURGERY_BACKEND", flag)
        with pytest.raises(surgery.SurgeryError) as e:
            surgery.run(recipe, folder / f"out{flag}")
        errors.append(str(e.value))
    return errors
