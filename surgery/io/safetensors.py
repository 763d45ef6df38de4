"""The safetensors format: dtypes, tensor metadata and the file header.

    header = read_header(Path("model.safetensors"))
    header.meta["lm_head.weight"]      # TensorMeta(dtype='BF16', shape=(32000, 4096))
    header.offsets["lm_head.weight"]   # absolute (start, end) byte range in the file

This module is the one place that knows the format; readers and writers take their tables from it.
"""

from __future__ import annotations

import json
import math
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
    """Parse the JSON header of one safetensors file."""
    with open(path, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise SurgeryError(f"{path}: not a safetensors file (too short)")
        n = int.from_bytes(size_bytes, "little")
        if n > MAX_HEADER_BYTES:
            raise SurgeryError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise SurgeryError(f"{path}: not a safetensors file (unreadable header)") from None
    metadata = header.pop("__metadata__", None) or {}
    meta = {k: TensorMeta(v["dtype"], tuple(v["shape"])) for k, v in header.items()}
    offsets = {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()}
    return Header(meta, offsets, metadata)
