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


MARKER_NAME = ".surgery-output"  # written into every output; --force replaces only a folder holding it
MANIFEST_NAME = "surgery_manifest.json"  # outputs of `surgery run` (also of versions before the marker)
# files only surgery writes: the marker, a run's manifest, the reports of adamergex and extract-lora (older outputs)
OUTPUT_MARKERS = (MARKER_NAME, MANIFEST_NAME, "surgery_adapter.json", "surgery_extract.json")
SPACE_MARGIN = 16 << 20  # free space kept beyond the known output size (support files, filesystem overhead)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, force: bool = False, *, inputs=(), size: int | None = None,
               command: str = "surgery"):
    """Yield a temp dir beside ``target``; rename it to ``target`` only if the block succeeds.

    Before anything is written: ``target`` must not overlap any path in ``inputs`` (the checkpoints, adapters
    and recipe the run reads), must not exist unless ``force`` and it is a previous surgery output, and its
    folder must have ``size`` bytes free. A lock beside ``target`` makes a second concurrent run fail.
    On an error or a signal, the temp dir and every parent folder this call created are removed.
    """
    target = check_target(target, force, inputs=inputs)
    created = _make_parents(target)
    try:
        with _lock(target):
            check_target(target, force, inputs=inputs)  # again, under the lock: another run may have finished
            _remove_stale(target)
            _check_space(target, size)
            tmp = target.parent / f".{target.name}.surgery-tmp-{os.getpid()}"
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
                yield tmp
                if not (tmp / MANIFEST_NAME).exists():  # a run output is known by its manifest
                    write_json(tmp / MARKER_NAME, {"tool": "surgery", "command": command})
                if target.exists():
                    old = target.parent / f".{target.name}.surgery-old-{os.getpid()}"
                    target.rename(old)
                    tmp.rename(target)
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
                else:
                    tmp.rename(target)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise _os_error(target, e, size) from None
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except BaseException:
        _remove_created(created)
        raise


def check_target(target, force: bool, *, inputs=()) -> Path:
    """The absolute output path, if writing it is allowed (see ``atomic_dir``); else a SurgeryError."""
    target = _absolute(target)
    for p in target.parents:
        if os.path.lexists(p) and not p.is_dir():
            raise SurgeryError(f"{target}: cannot create the output: {p} is a file, not a folder")
    for ref in inputs:
        src = _absolute(ref)
        if src == target or target in src.parents:
            raise SurgeryError(f"{target}: the output would replace the input {src}; choose another output folder")
        if src in target.parents:
            raise SurgeryError(f"{target}: the output is inside the input {src}; choose a folder outside it")
    if os.path.lexists(target):
        what = "directory" if target.is_dir() else "file"
        if not force:
            raise SurgeryError(f"output {what} {target} already exists; pass --force to replace it")
        if not is_surgery_output(target):
            raise SurgeryError(f"{target}: --force replaces only a previous surgery output, and this {what} is not "
                               f"one (no {MANIFEST_NAME} or {MARKER_NAME}); remove it yourself or choose another")
    return target


@contextlib.contextmanager
def demo_folder(folder: Path):
    """The folder `surgery demo` fills: new, empty, or a previous demo (never another folder); removed if
    the demo fails and it did not exist before."""
    folder = _absolute(folder)
    existed = os.path.lexists(folder)
    if existed and not (is_surgery_output(folder) or (folder / "checkpoints" / "profiles.json").is_file()):
        raise SurgeryError(f"{folder}: already exists and is not a previous demo folder; choose another --dir")
    created = [] if existed else [folder] + _make_parents(folder)
    try:
        folder.mkdir(exist_ok=True)
        yield folder
        write_json(folder / MARKER_NAME, {"tool": "surgery", "command": "demo"})
    except BaseException:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
            _remove_created(created[1:])
        raise


def is_surgery_output(path: Path) -> bool:
    """A folder surgery wrote (it holds the marker or a run manifest), or an empty folder."""
    if path.is_symlink() or not path.is_dir():
        return False
    return any((path / name).is_file() for name in OUTPUT_MARKERS) or not any(path.iterdir())


def _absolute(path) -> Path:
    """Absolute, with symlinks resolved (a loop is an error) so that overlaps are found through links."""
    from surgery.io.files import existing_path

    path = Path(os.path.abspath(Path(path).expanduser()))
    head, tail = path, []
    while not os.path.lexists(head) and head != head.parent:
        head, tail = head.parent, [head.name, *tail]
    return existing_path(head, str(path)).joinpath(*tail)


def _make_parents(target: Path) -> list[Path]:
    """Create the missing parents of ``target``; return them, deepest first, for removal on failure."""
    missing = [p for p in target.parents if not os.path.lexists(p)]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_created(missing)
        raise SurgeryError(f"{target}: cannot create the output folder: {e.strerror or e}") from None
    return missing


def _remove_created(created: list[Path]) -> None:
    for p in created:  # deepest first; only if still empty
        try:
            p.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def _lock(target: Path):
    """An exclusive lock on ``.<name>.surgery-lock`` beside ``target`` (fcntl.flock, released on exit)."""
    import fcntl

    path = target.parent / f".{target.name}.surgery-lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SurgeryError(f"{target}: cannot create the output: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SurgeryError(f"{target}: another surgery process is writing this output now "
                               f"(lock {path.name}); wait for it or choose another output") from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
    finally:
        os.close(fd)


def _check_space(target: Path, size: int | None) -> None:
    if not size:
        return
    free = shutil.disk_usage(target.parent).free
    if free < size + SPACE_MARGIN:
        raise SurgeryError(f"{target}: not enough free space: the output needs about "
                           f"{format_size(size + SPACE_MARGIN)}, {format_size(free)} free")


def _os_error(target: Path, e: OSError, size: int | None) -> SurgeryError:
    import errno

    if e.errno == errno.ENOSPC:
        need = f"; the output needs about {format_size(size + SPACE_MARGIN)}" if size else ""
        return SurgeryError(f"{target}: disk full while writing the output{need}; nothing was written")
    where = e.filename or target
    return SurgeryError(f"{where}: {e.strerror or e} while writing the output; nothing was written")


def _remove_stale(target: Path) -> None:
    """Remove temp dirs left beside ``target`` by killed runs (their process is gone)."""
    for p in target.parent.glob(f".{target.name}.surgery-tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with this id exists (a temp dir's or a lock's owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
