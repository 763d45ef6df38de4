"""The output directory: built in a hidden temp dir beside the target, renamed into place when complete.

    with atomic_dir("out/", force=False) as tmp:
        ...                                          # write shards, config, manifest into tmp
    # out/ now exists, complete; on an error or a signal nothing is left behind

Also the support files copied beside the weights (config, tokenizer) and JSON writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from surgery.errors import SurgeryError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "spiece.model")
CONFIG_FILES = ("config.json", "generation_config.json")


def write_json(path: Path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, force: bool = False):
    """Yield a temp dir beside ``target``; rename it to ``target`` only if the block succeeds."""
    target = Path(target).resolve()
    check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = target.parent / f".{target.name}.surgery-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.parent / f".{target.name}.surgery-old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale(target: Path) -> None:
    """Remove temp dirs left beside ``target`` by killed runs (their process is gone)."""
    for p in target.parent.glob(f".{target.name}.surgery-tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_target(target: Path, force: bool) -> None:
    if target.exists() and not force:
        what = "directory" if target.is_dir() else "file"
        raise SurgeryError(f"output {what} {target} already exists; pass --force to replace it")


def copy_support_files(src: Path, dst: Path, tokenizer_src: Path | None = None) -> list[str]:
    """Copy config and generation config from ``src`` and tokenizer files from ``tokenizer_src``
    (default ``src``); return the names copied."""
    copied = []
    for folder, names in ((src, CONFIG_FILES), (tokenizer_src or src, TOKENIZER_FILES)):
        for name in names:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, dst / name)
                copied.append(name)
    return copied


def format_size(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the Hub shows sizes)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
