"""Builders for the bad-input corpus (tests/cli/test_bad_inputs.py): real damaged files made from a real tiny
checkpoint, and a snapshot of a folder tree to prove that a refused command changed nothing.

    good = make_good(root)                              # a tiny llama checkpoint (config.json + model.safetensors)
    patch_header(path, lambda h: h["x"].pop("dtype"))   # rewrite a safetensors header, keeping the data
    before = snapshot(root); ...; assert snapshot(root) == before
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path


def make_good(root: Path) -> Path:
    """A tiny float32 llama checkpoint with config.json (architectures set, for mergekit)."""
    import torch
    from helpers import random_state, save_checkpoint, tiny_config

    cfg = tiny_config("llama", architectures=["LlamaForCausalLM"], num_hidden_layers=2)
    return save_checkpoint(root, random_state(cfg, seed=0), cfg, dtype=torch.float32)


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header, data: bytes) -> None:
    """A safetensors file from a header (dict or raw bytes) and a data section, with no checks."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def patch_header(path: Path, change) -> None:
    """Apply ``change(header)`` (in place, or returning a replacement) and rewrite the file, data unchanged."""
    header, data = read_st(path)
    new = change(header)
    write_st(path, header if new is None else new, data)


def first_tensor(header: dict) -> str:
    """The tensor at data offset 0."""
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def second_tensor(header: dict) -> str:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[1]


def snapshot(root: Path) -> dict:
    """Every path under root: file content hash, symlink target, or 'dir' (symlinks are not followed)."""
    out = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(folder) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
