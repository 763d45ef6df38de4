"""Downloading Hub inputs: quiet retries, one-line errors, and the LFS sha256 the cache already holds.

    local = fetch_snapshot("org/name@main", ["*.safetensors", "*.json"])   # a folder in the HF cache
    hub_blob_sha256(Path(local) / "model.safetensors")   # the Hub's sha256 of the file, no re-hashing
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from surgery.io.progress import library_bars


def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 the Hub gave an LFS file: the cache stores it as ``blobs/<sha256>`` behind a symlink."""
    try:
        blob = Path(os.readlink(path)).name if Path(path).is_symlink() else None
    except OSError:
        return None
    return blob if blob and re.fullmatch(r"[0-9a-f]{64}", blob) else None


@contextlib.contextmanager
def quiet_hub_logs(bars: bool | None = None):
    """huggingface_hub logs one warning line per retry; the error that ends the retries is what matters.
    Its progress bars follow the one rule (``surgery.io.progress``; ``bars``: on or off regardless)."""
    import logging

    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with library_bars(bars):
            yield
    finally:
        log.setLevel(level)


def fetch_snapshot(ref: str, patterns: list[str]) -> Path:
    """The local folder of Hub repository ``ref`` ('org/name[@revision]'), its files matching ``patterns``
    downloaded into the HF cache where missing; one line naming ``ref`` when it cannot be fetched."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from surgery.errors import SurgeryError

    repo_id, _, revision = ref.partition("@")
    try:
        with quiet_hub_logs():
            return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise SurgeryError(f"cannot fetch {ref!r} from the Hub: {hub_message(e)}") from None


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


