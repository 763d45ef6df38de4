"""Lazy, read-only access to safetensors checkpoints.

    ckpt = Checkpoint.open("path/to/model")         # a directory
    ckpt = Checkpoint.open("model.safetensors")     # one file
    ckpt = Checkpoint.open("org/name@main")         # a Hub id, through the HF cache
    w = ckpt.get("model.layers.0.mlp.up_proj.weight")  # one tensor, read on demand

Nothing is loaded until asked for, and only the asked-for tensor is read, with positioned
reads at its offsets from the safetensors header (see ``get``). Pickle ``.bin`` checkpoints
are refused unless ``convert_bin=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from surgery.errors import SurgeryError
from surgery.io.convert_bin import convert_bin_file
from surgery.io.files import cache_dir, file_stamp, stamp_of
from surgery.io.hub_fetch import fetch_snapshot, hub_blob_sha256
from surgery.io.reference import CHECKPOINT, resolve_reference
from surgery.io.safetensors import INDEX_NAME, SINGLE_NAME, TensorMeta, has_torch_dtype, read_header, torch_dtype

HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class PickleRefusedError(SurgeryError):
    """Only pickle weights were found and ``convert_bin`` was not given."""


@runtime_checkable
class TensorSource(Protocol):
    """What planners, the executor and the analysis read tensors from: a ``Checkpoint``, an adapter over
    its base (``surgery.adapters.view.AdapterCheckpoint``), a plan's result (``core.execute.PlanReader``)."""

    ref: str

    @property
    def meta(self) -> dict[str, TensorMeta]: ...

    def keys(self) -> list[str]: ...

    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str):
        """One tensor, in its stored dtype."""

    def get_float(self, name: str):
        """One tensor as float32, computed exactly where the source computes it (adapters, plans)."""


@dataclass
class Checkpoint:
    """A set of safetensors files plus the JSON/tokenizer files beside them."""

    ref: str                      # what the user wrote
    root: Path                    # directory holding config.json etc.
    weight_map: dict[str, Path]   # tensor name -> file
    meta: dict[str, TensorMeta]   # tensor name -> dtype/shape
    revision: str | None = None
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)  # absolute byte ranges
    stamps: dict[Path, tuple] = field(default_factory=dict, repr=False)  # file -> (inode, size, mtime) at open
    from_hub: bool = False
    source: Path | None = None    # the folder or file opened (what an output must not overlap)
    _handles: dict = field(default_factory=dict, repr=False)

    # ---- construction -------------------------------------------------
    @classmethod
    def open(cls, ref: str | os.PathLike, *, convert_bin: bool = False,
             base_dir: Path | None = None) -> "Checkpoint":
        """Open a directory, a .safetensors file, or a Hub id ``org/name[@revision]``.

        Relative paths are resolved against ``base_dir`` (the recipe's folder) first,
        then the working directory.
        """
        found = resolve_reference(ref, base_dir=base_dir, kinds=CHECKPOINT)
        if found.kind == "hub":
            return cls._open_hub(found.text, convert_bin)
        return cls._open_local(found.text, found.path, convert_bin)

    @classmethod
    def _open_local(cls, ref: str, path: Path, convert_bin: bool, revision=None) -> "Checkpoint":
        ck = cls._open_path(ref, path, convert_bin, revision)
        ck.source = Path(os.path.abspath(path))
        return ck

    @classmethod
    def _open_path(cls, ref: str, path: Path, convert_bin: bool, revision=None) -> "Checkpoint":
        suffix = path.suffix  # of the name given: a Hub cache file resolves to a blob without one
        path = path.resolve()
        if path.is_file():
            if suffix == ".safetensors":
                return cls._from_files(ref, path.parent, [path], revision)
            if suffix in (".bin", ".pt", ".pth"):
                return cls._from_bin(ref, path.parent, [path], convert_bin, revision)
            raise SurgeryError(f"{ref}: not a checkpoint file (expected .safetensors)")
        index = path / INDEX_NAME
        if index.exists():
            weight_map = read_index(index)
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise SurgeryError(f"{index}: index lists shard(s) that are missing: {', '.join(missing)}")
            ck = cls._from_files(ref, path, files, revision)
            for name, shard in weight_map.items():
                if ck.weight_map.get(name) != path / shard:
                    held = ck.weight_map.get(name)
                    raise SurgeryError(f"{index}: tensor {name!r} is indexed in shard {shard} but "
                                       + (f"is in {held.name}" if held else "no shard holds it"))
            return ck
        if (path / SINGLE_NAME).exists():
            return cls._from_files(ref, path, [path / SINGLE_NAME], revision)
        files = sorted(path.glob("*.safetensors"))
        if files:
            return cls._from_files(ref, path, files, revision)
        bins = sorted(path.glob("pytorch_model*.bin"))
        if bins:
            return cls._from_bin(ref, path, bins, convert_bin, revision)
        raise SurgeryError(f"{ref}: no safetensors weights in {path}")

    @classmethod
    def _from_files(cls, ref, root, files, revision) -> "Checkpoint":
        weight_map, meta, offsets, stats = {}, {}, {}, {}
        for f in files:
            header = read_header(f)
            for name, m in header.meta.items():
                if name in weight_map:
                    raise SurgeryError(f"{f}: tensor {name!r} is also in {weight_map[name].name}")
                weight_map[name] = f
                meta[name] = m
            offsets.update(header.offsets)
            stats[f] = file_stamp(f)
        return cls(ref=ref, root=root, weight_map=weight_map, meta=meta, revision=revision, offsets=offsets,
                   stamps=stats)

    @classmethod
    def _from_bin(cls, ref, root, files, convert_bin, revision) -> "Checkpoint":
        if not convert_bin:
            raise PickleRefusedError(
                f"{ref}: only pickle .bin weights found ({files[0].name}). Pickle files can run code "
                "when loaded, so they are refused. Pass --convert-bin to convert them once with "
                "torch.load(weights_only=True) into safetensors.")
        return cls._from_files(ref, root, [convert_bin_file(f) for f in files], revision)

    @classmethod
    def _open_hub(cls, ref: str, convert_bin: bool) -> "Checkpoint":
        local = fetch_snapshot(ref, HUB_PATTERNS + (["*.bin"] if convert_bin else []))
        revision = ref.partition("@")[2]
        ck = cls._open_local(ref, Path(local), convert_bin, revision or None)
        ck.from_hub = True
        return ck

    # ---- reading ------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str, out=None, rows: tuple[int, int] | None = None):
        """Read one tensor (a torch.Tensor in the file's dtype, in its own memory).

        Plain positioned reads rather than mmap: mapped pages count toward the process's
        memory and pile up to the size of the model; read buffers are freed with the tensor.
        ``out``, a uint8 tensor of at least the tensor's byte size, is filled and viewed
        instead of a new buffer (for readers that reuse buffers). ``rows=(a, b)`` reads only
        ``tensor[a:b]`` (rows along the first axis are contiguous in the file).
        """
        import torch

        path = self.weight_map[name]
        meta = self.meta[name]
        if not has_torch_dtype(meta.dtype):  # rare dtypes (unsigned ints): let safetensors map them
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as st:
                return st.get_tensor(name)
        start, end = self.byte_range(name, rows)
        shape = meta.shape if rows is None else (rows[1] - rows[0], *meta.shape[1:])
        buf = torch.empty(end - start, dtype=torch.uint8) if out is None else out[:end - start]
        if end > start:
            self.read_into(name, memoryview(buf.numpy()), start)
        return buf.view(torch_dtype(meta.dtype)).reshape(shape)

    def byte_range(self, name: str, rows: tuple[int, int] | None = None) -> tuple[int, int]:
        """Absolute ``(start, end)`` in its file of tensor ``name``, or of its rows ``a:b`` along the first axis."""
        start, end = self.offsets[name]
        if rows is None:
            return start, end
        row_bytes = (end - start) // self.meta[name].shape[0]
        return start + rows[0] * row_bytes, start + rows[1] * row_bytes

    def read_into(self, name: str, view: memoryview, start: int) -> None:
        """Fill ``view`` with bytes of ``name``'s file from absolute offset ``start`` (positioned reads)."""
        path = self.weight_map[name]
        f = self._handles.get(path)
        if f is None:
            f = self._handles[path] = self._open_file(path)
        got = 0
        while got < len(view):
            n = os.preadv(f.fileno(), [view[got:]], start + got)
            if n <= 0:
                raise SurgeryError(f"{path}: file ends inside tensor {name!r}: it changed after it was opened")
            got += n

    def get_float(self, name: str):
        return self.get(name).float()

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.weight_map.values()))

    @property
    def config(self) -> dict:
        path = self.root / "config.json"
        if not path.exists():
            return {}
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError) as e:
            raise SurgeryError(f"{path}: not a valid config ({str(e).splitlines()[0]})") from None
        if not isinstance(config, dict):
            raise SurgeryError(f"{path}: not a valid config (a JSON {type(config).__name__}, not an object)")
        return config

    def file_hashes(self) -> dict[str, str]:
        """sha256 of each weight file, keyed by file name."""
        return {f.name: self.sha256(f) for f in self.files}

    def sha256(self, path: Path, cancel=None) -> str:
        """sha256 of one weight file: for a Hub input, the Hub's LFS hash (the blob's name in the cache)."""
        known = hub_blob_sha256(path) if self.from_hub else None
        return known or sha256_file(path, cancel=cancel)

    def _open_file(self, path: Path):
        try:
            f = open(path, "rb", buffering=0)
        except OSError as e:
            raise SurgeryError(f"{path}: cannot open: {e.strerror or e} (was it deleted or moved during the run?)"
                               ) from None
        if path in self.stamps and stamp_of(os.fstat(f.fileno())) != self.stamps[path]:
            f.close()
            raise SurgeryError(f"{path}: the file changed after it was opened (replaced during the run?)")
        return f

    def check_unchanged(self) -> None:
        """Refuse a file replaced or modified since the checkpoint was opened (the hashes would be wrong)."""
        for path, stamp in self.stamps.items():
            try:
                now = file_stamp(path)
            except SurgeryError:
                raise SurgeryError(f"{path}: the file was deleted or moved during the run") from None
            if now != stamp:
                raise SurgeryError(f"{path}: the file changed during the run (replaced or modified)")

    def __getstate__(self) -> dict:
        """Pickled without its open files (a Ray task reopens them on first read; the stamps still guard them)."""
        return {**self.__dict__, "_handles": {}}

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


def read_index(index: Path) -> dict[str, str]:
    """The weight_map of a sharded checkpoint's index: tensor name -> shard file name."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{index}: not a valid safetensors index (not JSON: {str(e).splitlines()[0]})") from None
    except OSError as e:
        raise SurgeryError(f"{index}: cannot read: {e.strerror or e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise SurgeryError(f"{index}: not a valid safetensors index (weight_map must be a mapping of tensor name "
                           "to shard file)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise SurgeryError(f"{index}: tensor {name!r}: shard {shard!r} is not a file name in the folder")
    return weight_map


def sha256_file(path: Path, chunk: int = 4 << 20, cancel=None) -> str:
    """sha256 of a file, remembered per (path, size, mtime) in the user cache.

    Hashing runs at ~0.5 GB/s, so re-running a recipe on the same multi-GB inputs would
    otherwise spend most of its time re-hashing them.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    cached = cache_dir() / "sha256" / key
    try:
        digest = cached.read_text().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    h = hashlib.sha256()
    buf = bytearray(chunk)  # one reused buffer: no new allocation per chunk (kept in RSS by the thread arena)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if cancel is not None and cancel.is_set():
                raise SurgeryError(f"{path}: hashing cancelled")
            h.update(view[:n])
    digest = h.hexdigest()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(digest)
        tmp.rename(cached)
    except OSError:
        pass  # a read-only cache only costs the re-hash
    return digest
