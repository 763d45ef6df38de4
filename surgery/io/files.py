"""File-system checks shared by every reader: one-line errors for symlink loops, dangling links,
unreadable or non-UTF-8 files, and stamps that detect a file replaced or modified during a run.

    existing_path(Path("model"), "model")     # resolved path, or SurgeryError('model: symlink loop at model')
    text = read_text(Path("recipe.yaml"))      # str, or SurgeryError('recipe.yaml: not UTF-8 text (...)')
    for lineno, record in json_lines(path, text): ...   # JSONL: one object a line, blank lines skipped
    stamp = file_stamp(path)                   # compare later: (device, inode, size, mtime)
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from surgery.errors import SurgeryError


def cache_dir() -> Path:
    """surgery's user cache (hashes, converted pickles): $SURGERY_CACHE or ~/.cache/surgery."""
    return Path(os.environ.get("SURGERY_CACHE", Path.home() / ".cache" / "surgery"))


def file_stamp(path: Path) -> tuple:
    try:
        return stamp_of(os.stat(path))
    except OSError as e:
        raise SurgeryError(f"{path}: cannot read: {e.strerror or e}") from None


def stamp_of(st) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def existing_path(path: Path, what: str) -> Path:
    """``path`` resolved, refusing symlink loops and dangling links with a one-line message."""
    try:
        return Path(path).resolve(strict=True)
    except RuntimeError:  # Python 3.11 raises RuntimeError on a symlink loop
        raise SurgeryError(f"{what}: symlink loop at {path}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SurgeryError(f"{what}: symlink loop at {path}") from None
        if e.errno == errno.ENOENT:
            raise SurgeryError(f"{what}: {path} is a broken symlink (its target does not exist)") from None
        raise SurgeryError(f"{what}: cannot access {path}: {e.strerror or e}") from None


def read_text(path: Path, what: str | None = None, max_bytes: int | None = None) -> str:
    """A UTF-8 text file's content; symlink loops, permissions, directories, size and encoding in one line."""
    where = what or str(path)
    real = existing_path(path, where)
    if real.is_dir():
        raise SurgeryError(f"{where}: is a directory, not a file")
    try:
        size = real.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise SurgeryError(f"{where}: {size} bytes; larger than the {max_bytes}-byte limit")
        data = real.read_bytes()
    except OSError as e:
        raise SurgeryError(f"{where}: cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SurgeryError(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def json_lines(path: Path, text: str):
    """``(line number, object)`` for each non-blank line of a JSONL text read from ``path``; a line that is not
    JSON, or not a JSON object, is refused with the file and line."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SurgeryError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise SurgeryError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record
