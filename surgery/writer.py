"""Streaming, sharded, atomic output.

    with atomic_dir("out/", force=False) as tmp:
        with ShardedWriter(tmp, specs, max_shard_bytes=2 * 10**9) as w:
            for name, tensor in stream:
                w.write(name, tensor)          # bytes go straight to disk
        write_json(tmp / "surgery_manifest.json", manifest)

Shard headers are computed from the planned names, dtypes and shapes before any tensor is
computed, so each tensor is written as soon as it exists and memory holds one at a time. Files
are standard safetensors (loaded by ``safetensors`` and ``transformers``). The output appears at
its final path only when complete: it is built in a hidden temp dir beside it, then renamed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from .checkpoint import INDEX_NAME, SINGLE_NAME, TensorMeta
from .errors import SurgeryError

TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "spiece.model")
CONFIG_FILES = ("config.json", "generation_config.json")


def torch_dtype(st_dtype: str):
    import torch

    return getattr(torch, TORCH_DTYPES[st_dtype])


def shard_layout(specs: list[tuple[str, TensorMeta]], max_bytes: int) -> list[list[tuple[str, TensorMeta]]]:
    """Greedy split in order; a tensor larger than max_bytes gets a shard of its own."""
    shards, current, size = [], [], 0
    for name, meta in specs:
        if current and size + meta.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, meta))
        size += meta.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardedWriter:
    """Writes tensors, in the announced order, into safetensors shards plus an index."""

    def __init__(self, folder: Path, specs: list[tuple[str, TensorMeta]], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = shard_layout(specs, max_shard_bytes)
        self.files = shard_names(len(self.shards))
        self.order = [(fi, name, meta) for fi, shard in enumerate(self.shards) for name, meta in shard]
        self.pos = 0
        self.fh = None
        self.current = -1

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if self.fh:
            self.fh.close()
        if exc_type is None:
            if self.pos != len(self.order):
                raise SurgeryError(f"internal: wrote {self.pos} of {len(self.order)} planned tensors")
            if len(self.files) > 1:
                self._write_index()

    def _open(self, fi: int) -> None:
        if self.fh:
            self.fh.close()
        self.current = fi
        header, offset = {"__metadata__": self.metadata}, 0
        for name, meta in self.shards[fi]:
            header[name] = {"dtype": meta.dtype, "shape": list(meta.shape),
                            "data_offsets": [offset, offset + meta.nbytes]}
            offset += meta.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section, as safetensors does
        self.fh = open(self.folder / self.files[fi], "wb")
        self.fh.write(len(raw).to_bytes(8, "little"))
        self.fh.write(raw)

    def write(self, name: str, tensor) -> None:
        fi, want, meta = self.order[self.pos]
        if name != want:
            raise SurgeryError(f"internal: expected tensor {want!r}, got {name!r}")
        if fi != self.current:
            self._open(fi)
        import torch

        t = tensor.detach().to("cpu").contiguous()
        if t.dtype != torch_dtype(meta.dtype):
            t = t.to(torch_dtype(meta.dtype))
        if tuple(t.shape) != meta.shape:
            raise SurgeryError(f"internal: tensor {name!r} has shape {list(t.shape)}, planned {list(meta.shape)}")
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self.fh.write(memoryview(data))
        self.pos += 1

    def _write_index(self) -> None:
        total = sum(m.nbytes for _, _, m in self.order)
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: self.files[fi] for fi, name, _ in self.order}}
        write_json(self.folder / INDEX_NAME, index)


def write_json(path: Path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, force: bool = False):
    """Yield a temp dir beside ``target``; rename it to ``target`` only if the block succeeds."""
    target = Path(target).resolve()
    check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = target.parent / f".{target.name}.surgery-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.parent / f".{target.name}.surgery-old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale(target: Path) -> None:
    """Remove temp dirs left beside ``target`` by killed runs (their process is gone)."""
    for p in target.parent.glob(f".{target.name}.surgery-tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_target(target: Path, force: bool) -> None:
    if target.exists() and not force:
        what = "directory" if target.is_dir() else "file"
        raise SurgeryError(f"output {what} {target} already exists; pass --force to replace it")


def copy_support_files(src: Path, dst: Path, tokenizer_src: Path | None = None) -> list[str]:
    """Copy config and generation config from ``src`` and tokenizer files from ``tokenizer_src``
    (default ``src``); return the names copied."""
    copied = []
    for folder, names in ((src, CONFIG_FILES), (tokenizer_src or src, TOKENIZER_FILES)):
        for name in names:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, dst / name)
                copied.append(name)
    return copied
