"""Streaming, sharded safetensors output.

    with ShardedWriter(folder, specs, max_shard_bytes=2 * 10**9) as w:
        for name, tensor in stream:
            w.write(name, tensor)          # bytes go straight to disk
        w.copy(name, src_path, start, end) # or: the bytes of a file range, copied by the kernel

Shard headers are computed from the planned names, dtypes and shapes before any tensor is
computed, so each tensor is written as soon as it exists and memory holds one at a time. A tensor
that is only copied is given as its byte range in an input file; runs of such ranges that lie back
to back in one file are copied in one kernel call (``surgery.io.copy``). Files
are standard safetensors (loaded by ``safetensors`` and ``transformers``). See ``surgery.io.output``
for the atomic output directory around it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.io.copy import copy_range
from surgery.io.output import write_json
from surgery.io.safetensors import INDEX_NAME, SINGLE_NAME, TensorMeta, torch_dtype


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
                 metadata: dict[str, str] | None = None, only: list[int] | None = None):
        """``only``: write just these shards of the layout (a Ray task's part), without the index; the
        tensors given are then those of these shards, in order."""
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = shard_layout(specs, max_shard_bytes)
        self.files = shard_names(len(self.shards))
        self.only = only
        self.order = [(fi, name, meta) for fi, shard in enumerate(self.shards) for name, meta in shard
                      if only is None or fi in only]
        self.pos = 0
        self.fh = None
        self.current = -1
        self.sources: dict[Path, int] = {}   # input file -> fd, for copies
        self.run: list | None = None         # pending copy run: [path, src_start, src_end]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        try:
            if exc_type is None:
                self._flush_run()
        finally:
            if self.fh:
                self.fh.close()
            for fd in self.sources.values():
                os.close(fd)
            self.sources.clear()
        if exc_type is None:
            if self.pos != len(self.order):
                raise SurgeryError(f"internal: wrote {self.pos} of {len(self.order)} planned tensors")
            if len(self.files) > 1 and self.only is None:
                write_index(self.folder, self.shards)

    def _open(self, fi: int) -> None:
        self._flush_run()
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

    def _next(self, name: str) -> TensorMeta:
        fi, want, meta = self.order[self.pos]
        if name != want:
            raise SurgeryError(f"internal: expected tensor {want!r}, got {name!r}")
        if fi != self.current:
            self._open(fi)
        return meta

    def copy(self, name: str, path: Path, start: int, end: int) -> None:
        """The next tensor is the bytes ``[start, end)`` of file ``path``: copy them without reading them
        into Python. Back-to-back ranges of one file are merged into one copy (done when the run ends)."""
        meta = self._next(name)
        if end - start != meta.nbytes:
            raise SurgeryError(f"internal: tensor {name!r} is {end - start} bytes in {path}, planned {meta.nbytes}")
        run = self.run
        if run is not None and run[0] == path and run[2] == start:
            run[2] = end
        else:
            self._flush_run()
            self.run = [path, start, end]
        self.pos += 1

    def _flush_run(self) -> None:
        if self.run is None:
            return
        path, start, end = self.run
        self.run = None
        fd = self.sources.get(path)
        if fd is None:
            fd = self.sources[path] = os.open(path, os.O_RDONLY)
        self.fh.flush()
        dst = self.fh.tell()
        try:
            copy_range(fd, self.fh.fileno(), start, dst, end - start)
        except OSError as e:
            raise SurgeryError(f"{path}: cannot copy bytes {start}-{end} into {self.fh.name}: {e}") from None
        self.fh.seek(dst + end - start)

    def write(self, name: str, tensor) -> None:
        """Append a tensor: a torch tensor (cast to the planned dtype here) or a numpy array that already
        holds the planned dtype's bytes (``core.host_math``: bfloat16 as uint16)."""
        meta = self._next(name)
        self._flush_run()
        if type(tensor).__module__ == "numpy":
            if tuple(tensor.shape) != meta.shape or tensor.nbytes != meta.nbytes:
                raise SurgeryError(f"internal: tensor {name!r} has shape {list(tensor.shape)} ({tensor.dtype}), "
                                   f"planned {list(meta.shape)} {meta.dtype}")
            self.fh.write(memoryview(tensor.reshape(-1).view("uint8")) if tensor.size else b"")
            self.pos += 1
            return
        import torch

        t = tensor.detach().to("cpu").contiguous()
        if t.dtype != torch_dtype(meta.dtype):
            t = t.to(torch_dtype(meta.dtype))
        if tuple(t.shape) != meta.shape:
            raise SurgeryError(f"internal: tensor {name!r} has shape {list(t.shape)}, planned {list(meta.shape)}")
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self.fh.write(memoryview(data))
        self.pos += 1

    @property
    def written(self) -> list[str]:
        """The shard files this writer writes."""
        return [f for fi, f in enumerate(self.files) if self.only is None or fi in self.only]


def write_index(folder: Path, shards: list[list[tuple[str, TensorMeta]]]) -> None:
    """``model.safetensors.index.json`` of a shard layout, as transformers writes and reads it."""
    files = shard_names(len(shards))
    index = {"metadata": {"total_size": sum(m.nbytes for shard in shards for _, m in shard)},
             "weight_map": {name: files[fi] for fi, shard in enumerate(shards) for name, _ in shard}}
    write_json(Path(folder) / INDEX_NAME, index)
