"""Downloading Hub inputs: quiet retries, one-line errors, and the LFS sha256 the cache already holds.

    with quiet_hub_logs():
        local = snapshot_download(...)
    hub_blob_sha256(Path(local) / "model.safetensors")   # the Hub's sha256 of the file, no re-hashing
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path


def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 the Hub gave an LFS file: the cache stores it as ``blobs/<sha256>`` behind a symlink."""
    try:
        blob = Path(os.readlink(path)).name if Path(path).is_symlink() else None
    except OSError:
        return None
    return blob if blob and re.fullmatch(r"[0-9a-f]{64}", blob) else None


@contextlib.contextmanager
def quiet_hub_logs():
    """huggingface_hub logs one warning line per retry; the error that ends the retries is what matters."""
    import logging

    import sys

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    log = logging.getLogger("huggingface_hub")
    level, bars_off = log.level, are_progress_bars_disabled()
    log.setLevel(logging.ERROR)
    if not sys.stderr.isatty():  # progress bars only for a person watching; scripts get the one error line
        disable_progress_bars()
    try:
        yield
    finally:
        log.setLevel(level)
        if not bars_off:
            enable_progress_bars()


def hub_message(e: BaseException) -> str:
    """One line for a failed download: the server's message, not a JSON decoder's complaint about HTML."""
    from huggingface_hub import errors

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, errors.GatedRepoError):
        return f"{status}: the repository is gated; accept its terms on the Hub, then pass a token (HF_TOKEN)"
    if isinstance(e, errors.RepositoryNotFoundError):
        return (f"{status}: repository not found, or private and the token (HF_TOKEN or `hf auth login`) "
                "does not grant access")
    if isinstance(e, errors.RevisionNotFoundError):
        return f"{status}: revision not found in the repository"
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, ValueError) and ("Expecting value" in first or "JSON" in first):
        return "the server's reply is not JSON (an HTML page? check HF_ENDPOINT)"
    return first


