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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from surgery.errors import SurgeryError
from surgery.io.safetensors import INDEX_NAME, SINGLE_NAME, TensorMeta, has_torch_dtype, read_header, torch_dtype

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


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
    _handles: dict = field(default_factory=dict, repr=False)

    # ---- construction -------------------------------------------------
    @classmethod
    def open(cls, ref: str | os.PathLike, *, convert_bin: bool = False,
             base_dir: Path | None = None) -> "Checkpoint":
        """Open a directory, a .safetensors file, or a Hub id ``org/name[@revision]``.

        Relative paths are resolved against ``base_dir`` (the recipe's folder) first,
        then the working directory.
        """
        text = str(ref)
        for candidate in local_candidates(text, base_dir):
            if candidate.exists():
                return cls._open_local(text, candidate, convert_bin)
        if HUB_ID.match(text) and not text.startswith((".", "/")):
            return cls._open_hub(text, convert_bin)
        raise SurgeryError(f"checkpoint not found: {text!r} is neither a local path nor a Hub id "
                           "like 'org/name' or 'org/name@revision'")

    @classmethod
    def _open_local(cls, ref: str, path: Path, convert_bin: bool, revision=None) -> "Checkpoint":
        path = path.resolve()
        if path.is_file():
            if path.suffix == ".safetensors":
                return cls._from_files(ref, path.parent, [path], revision)
            if path.suffix in (".bin", ".pt", ".pth"):
                return cls._from_bin(ref, path.parent, [path], convert_bin, revision)
            raise SurgeryError(f"{ref}: not a checkpoint file (expected .safetensors)")
        index = path / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError):
                raise SurgeryError(f"{index}: not a valid safetensors index (no weight_map)") from None
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise SurgeryError(f"{ref}: index lists shard(s) that are missing: {', '.join(missing)}")
            return cls._from_files(ref, path, files, revision)
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
        weight_map, meta, offsets = {}, {}, {}
        for f in files:
            header = read_header(f)
            for name, m in header.meta.items():
                weight_map[name] = f
                meta[name] = m
            offsets.update(header.offsets)
        return cls(ref=ref, root=root, weight_map=weight_map, meta=meta, revision=revision, offsets=offsets)

    @classmethod
    def _from_bin(cls, ref, root, files, convert_bin, revision) -> "Checkpoint":
        if not convert_bin:
            raise SurgeryError(
                f"{ref}: only pickle .bin weights found ({files[0].name}). Pickle files can run code "
                "when loaded, so they are refused. Pass --convert-bin to convert them once with "
                "torch.load(weights_only=True) into safetensors.")
        return cls._from_files(ref, root, [_convert_bin(f) for f in files], revision)

    @classmethod
    def _open_hub(cls, ref: str, convert_bin: bool) -> "Checkpoint":
        repo_id, _, revision = ref.partition("@")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        patterns = HUB_PATTERNS + (["*.bin"] if convert_bin else [])
        try:
            local = snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SurgeryError(f"cannot fetch {ref!r} from the Hub: {first}") from None
        return cls._open_local(ref, Path(local), convert_bin, revision or None)

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
        f = self._handles.get(path)
        if f is None:
            f = self._handles[path] = open(path, "rb", buffering=0)
        start, end = self.offsets[name]
        shape = meta.shape
        if rows is not None:
            a, b = rows
            row_bytes = (end - start) // shape[0]
            start, end = start + a * row_bytes, start + b * row_bytes
            shape = (b - a, *shape[1:])
        buf = torch.empty(end - start, dtype=torch.uint8) if out is None else out[:end - start]
        if end > start:
            view = memoryview(buf.numpy())
            got = 0
            while got < len(view):
                n = os.preadv(f.fileno(), [view[got:]], start + got)
                if n <= 0:
                    raise SurgeryError(f"{path}: file ends inside tensor {name!r} (truncated download?)")
                got += n
        return buf.view(torch_dtype(meta.dtype)).reshape(shape)

    def get_float(self, name: str):
        return self.get(name).float()

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.weight_map.values()))

    @property
    def config(self) -> dict:
        path = self.root / "config.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def file_hashes(self) -> dict[str, str]:
        """sha256 of each weight file, keyed by file name."""
        return {f.name: sha256_file(f) for f in self.files}

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


def sha256_file(path: Path, chunk: int = 4 << 20) -> str:
    """sha256 of a file, remembered per (path, size, mtime) in the user cache.

    Hashing runs at ~0.5 GB/s, so re-running a recipe on the same multi-GB inputs would
    otherwise spend most of its time re-hashing them.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    cached = _cache_dir() / "sha256" / key
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


def _cache_dir() -> Path:
    return Path(os.environ.get("SURGERY_CACHE", Path.home() / ".cache" / "surgery"))


def local_candidates(text: str, base_dir: Path | None) -> list[Path]:
    p = Path(text).expanduser()
    if p.is_absolute() or base_dir is None:
        return [p]
    return [base_dir / p, p]


def _convert_bin(path: Path) -> Path:
    """Convert one pickle file to safetensors in the user cache, once; return the new path."""
    import torch
    from safetensors.torch import save_file

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = _cache_dir() / "converted" / key
    out = cache / (path.stem + ".safetensors")
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's file
            raise SurgeryError(f"{path}: cannot load with weights_only=True: {e}") from None
        state = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
        _dedupe_shared(state)
        tmp = out.with_suffix(".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.rename(out)
    return out


def _dedupe_shared(state: dict) -> None:
    """safetensors refuses tensors that share storage (tied weights); give each its own copy."""
    seen = set()
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            state[k] = v.clone()
        seen.add(ptr)
