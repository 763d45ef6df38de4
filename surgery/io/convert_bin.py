"""Pickle checkpoints (``--convert-bin``): loaded once with torch.load(weights_only=True) and saved as
safetensors in the user cache; anything else in the pickle is refused with one line saying what.

    convert_bin_file(Path("pytorch_model.bin"))   # -> ~/.cache/surgery/converted/<key>/pytorch_model.safetensors
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.io.files import cache_dir


def convert_bin_file(path: Path) -> Path:
    """Convert one pickle file to safetensors in the user cache, once; return the new path."""
    import torch
    from safetensors.torch import save_file

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = cache_dir() / "converted" / key
    out = cache / (path.stem + ".safetensors")
    if not out.exists():
        try:
            with warnings.catch_warnings():  # e.g. torch's note on pickle protocols: the error line says it all
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's file
            raise SurgeryError(f"{path}: cannot load with weights_only=True: {_unpickle_reason(e)}") from None
        if not isinstance(state, dict):
            raise SurgeryError(f"{path}: not a state dict (a pickled {type(state).__name__})")
        cache.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
        _dedupe_shared(state)
        tmp = out.with_suffix(".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.rename(out)
    return out


def _unpickle_reason(e: Exception) -> str:
    """One line from torch's multi-line weights_only refusal: what in the file was refused."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    if "Weights only load failed" not in lines[0]:
        return lines[0]
    m = re.search(r"GLOBAL (\S+)", str(e))
    if m:
        return f"it holds objects other than tensors ({m[1]}); refused: unpickling them could run code"
    after = [x for i, x in enumerate(lines) if i and "WeightsUnpickler error" in lines[i - 1]]
    detail = after[0] if after else lines[1] if len(lines) > 1 else "refused"
    return f"not a file the safe loader can read ({detail})"


def _dedupe_shared(state: dict) -> None:
    """safetensors refuses tensors that share storage (tied weights); give each its own copy."""
    seen = set()
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            state[k] = v.clone()
        seen.add(ptr)
