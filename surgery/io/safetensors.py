"""The safetensors format: dtypes, tensor metadata and the file header.

    header = read_header(Path("model.safetensors"))
    header.meta["lm_head.weight"]      # TensorMeta(dtype='BF16', shape=(32000, 4096))
    header.offsets["lm_head.weight"]   # absolute (start, end) byte range in the file

This module is the one place that knows the format; readers and writers take their tables from it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import SurgeryError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

# safetensors dtype string -> (bytes per element, torch dtype name or None where torch has none)
DTYPES: dict[str, tuple[int, str | None]] = {
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"),
    "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"),
    "U64": (8, None), "U32": (4, None), "U16": (2, None), "U8": (1, "uint8"), "BOOL": (1, "bool"),
}
FLOATING = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# recipe dtype names (output.dtype, --dtype) -> safetensors dtype strings
FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def torch_dtype(st_dtype: str):
    """The torch dtype of a safetensors dtype string (``KeyError`` for dtypes torch lacks)."""
    import torch

    name = DTYPES[st_dtype][1]
    if name is None:
        raise KeyError(st_dtype)
    return getattr(torch, name)


def has_torch_dtype(st_dtype: str) -> bool:
    return DTYPES.get(st_dtype, (0, None))[1] is not None


def st_dtype(torch_dt) -> str:
    """The safetensors dtype string of a torch dtype."""
    name = str(torch_dt).removeprefix("torch.")
    for key, (_, tname) in DTYPES.items():
        if tname == name:
            return key
    raise KeyError(name)


@dataclass(frozen=True)
class TensorMeta:
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return DTYPES[self.dtype][0] * math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: tensor metadata and absolute byte ranges."""

    meta: dict[str, TensorMeta]
    offsets: dict[str, tuple[int, int]]
    metadata: dict[str, str]


def read_header(path: Path) -> Header:
    """Parse and validate the header of one safetensors file, as the safetensors library does.

    Refused (one line naming the file and the tensor): a header length past the end of the file, a header
    that is not a JSON object, an entry without ``dtype``/``shape``/``data_offsets`` or with an unknown dtype,
    negative dims or offsets, offsets that overlap, leave gaps or run past the data section, a shape whose
    byte size differs from its offsets, and a file whose size is not exactly header + data.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            size_bytes = f.read(8)
            if len(size_bytes) != 8:
                raise SurgeryError(f"{path}: not a safetensors file (too short)")
            n = int.from_bytes(size_bytes, "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SurgeryError(f"{path}: not a safetensors file (header length {n}, file size {size})")
            raw = f.read(n)
    except OSError as e:
        raise SurgeryError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{path}: not a safetensors file (header is not JSON: {_first(e)})") from None
    if not isinstance(header, dict):
        raise SurgeryError(f"{path}: invalid safetensors header: a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SurgeryError(f"{path}: invalid safetensors header: __metadata__ must map strings to strings")
    meta, spans = {}, []
    for name, entry in header.items():
        meta[name] = m = _entry(path, name, entry)
        s, e = entry["data_offsets"]
        if e - s != m.nbytes:
            raise SurgeryError(f"{path}: tensor {name!r}: shape {list(m.shape)} of {m.dtype} is {m.nbytes} bytes but "
                               f"data_offsets [{s}, {e}] span {e - s}")
        spans.append((s, e, name))
    end = 0
    for s, e, name in sorted(spans):
        if s != end:
            what = "overlaps the tensor before it" if s < end else f"leaves a gap of {s - end} bytes before it"
            raise SurgeryError(f"{path}: tensor {name!r}: data_offsets [{s}, {e}] {what}")
        end = e
    if 8 + n + end != size:
        raise SurgeryError(f"{path}: the header describes {end} bytes of tensor data but the file holds "
                           f"{size - 8 - n} (truncated or padded file)")
    offsets = {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()}
    return Header(meta, offsets, metadata)


def _entry(path, name, entry) -> TensorMeta:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise SurgeryError(f"{where}: header entry is a JSON {type(entry).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise SurgeryError(f"{where}: header entry has no {key!r}")
    dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SurgeryError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_uint(d) for d in shape):
        raise SurgeryError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offs, list) or len(offs) != 2 or not all(_uint(o) for o in offs) or offs[1] < offs[0]:
        raise SurgeryError(f"{where}: data_offsets {offs!r} are not [start, end] with 0 <= start <= end")
    return TensorMeta(dtype, tuple(shape))


def _uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k!r}")
        seen[k] = v
    return seen


def _first(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
