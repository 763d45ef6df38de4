"""Where the executor's math runs: the device for merge operations and the CPU threads torch may use.

    device = resolve_device("auto")          # "cuda" when torch sees a GPU, else "cpu"
    with compute_context(device):            # what `execute` does around the tensors it computes
        current_device()                     # -> "cuda": merge operations move their inputs there

CPU threads: by default the executor runs torch's own (OpenMP) operations on ONE thread (``--threads``,
``SURGERY_THREADS`` or ``OMP_NUM_THREADS`` choose otherwise; the bytes never depend on it). Its elementwise math is
memory-bound and already overlaps reading and writing; OpenMP's idle workers spin between the many
small operations and, measured on a 2-core machine, burned 3x the CPU time of the math itself
(linear merge of two 0.5 GB models: 16 CPU-s with 2 threads, 4 with 1). Work that does parallelise
(TIES's per-model sparsification) uses its own thread pool (``surgery.merge.gta``).
"""

from __future__ import annotations

import contextlib
import contextvars
import os

from surgery.errors import SurgeryError

DEVICES = ("cpu", "cuda", "auto")
# which implementations may compute (``surgery run --backend``; the merge methods' table is ``surgery.merge.table``):
# auto: the fastest exact one (compiled kernels, then numpy, then torch, then mergekit's own kernels); numpy: no
# compiled kernels; torch: no host (numpy/compiled) math at all; mergekit: merge methods only through mergekit's
# own kernels. Every level writes the same bytes; the levels exist to compare and debug the backends.
BACKENDS = ("auto", "numpy", "torch", "mergekit")
BACKEND_ENV = "SURGERY_BACKEND"  # the one debugging switch: the default of --backend (docs/performance.md)
_backend: str | None = None
_device: contextvars.ContextVar[str] = contextvars.ContextVar("surgery_device", default="cpu")
_requested: int | None = None   # `surgery run --threads N`, recorded without importing torch
threads_used: int | None = None  # torch threads of the last compute_context (None: nothing was computed)


def request_threads(n: int | None) -> None:
    """Record ``--threads`` for the executor; torch is imported (and set) only when a tensor is computed."""
    global _requested
    _requested = n


def executor_threads() -> int | None:
    """The executor's torch threads: --threads, else SURGERY_THREADS, else torch's own setting when
    OMP_NUM_THREADS is set (None), else 1 (see the module docstring for why not one per core)."""
    from surgery.core.threads import parse_threads

    if _requested is not None:
        return _requested
    if os.environ.get("SURGERY_THREADS"):
        return parse_threads(os.environ["SURGERY_THREADS"], "SURGERY_THREADS")
    return None if os.environ.get("OMP_NUM_THREADS") else 1


def request_backend(name: str | None) -> None:
    """Set the backend level (``BACKENDS``) for what follows; None: back to $SURGERY_BACKEND, else 'auto'."""
    global _backend
    _backend = None if name is None else check_backend(name, "--backend")


def check_backend(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise SurgeryError(f"{where}: unknown backend {name!r} (expected one of: {', '.join(BACKENDS)})")
    return name


def backend() -> str:
    """The backend level: --backend (``request_backend``), else $SURGERY_BACKEND, else 'auto'."""
    if _backend is not None:
        return _backend
    env = os.environ.get(BACKEND_ENV)
    return check_backend(env, BACKEND_ENV) if env else "auto"


@contextlib.contextmanager
def use_backend(name: str | None):
    """``request_backend(name)`` for the block (None: leave the level as it is), then restore it."""
    global _backend
    before = _backend
    if name is not None:
        request_backend(name)
    try:
        yield
    finally:
        _backend = before


def host_math_allowed() -> bool:
    """Whether numpy and compiled kernels may compute (the 'auto' and 'numpy' levels)."""
    return backend() in ("auto", "numpy")


def resolve_device(name: str | None) -> str:
    """'cpu', 'cuda' (or 'cuda:N') or 'auto' -> the torch device math runs on (merges, `surgery eval`). torch is
    imported only for cuda/auto."""
    name = name or "cpu"
    if name not in DEVICES and not name.startswith("cuda:"):
        raise SurgeryError(f"unknown device {name!r} (expected one of: {', '.join(DEVICES)})")
    if name == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda" if name == "auto" else name
    if name != "auto":
        raise SurgeryError("device 'cuda': torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                           "use --device auto or cpu")
    return "cpu"


def current_device() -> str:
    """The device merge operations compute on (set by ``compute_context``; 'cpu' outside it)."""
    return _device.get()


@contextlib.contextmanager
def compute_context(device: str = "cpu", threads: int | None = None):
    """Set the merge device and torch's intra-op thread count (default ``executor_threads()``) for the
    block, then restore both."""
    import torch

    global threads_used
    keep_freed_memory()
    before = torch.get_num_threads()
    threads = threads or executor_threads() or before
    token = _device.set(device)
    if threads != before:
        torch.set_num_threads(threads)
    threads_used = threads
    try:
        yield
    finally:
        _device.reset(token)
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def writer_threads() -> None:
    """Give the calling (writer) thread the executor's thread count: OpenMP's setting is per thread."""
    import torch

    if threads_used and torch.get_num_threads() != threads_used:
        torch.set_num_threads(threads_used)


_MALLOC_TUNED = False


def keep_freed_memory() -> None:
    """Let glibc's malloc reuse freed tensor buffers instead of returning them to the kernel.

    The executor allocates and frees buffers of the same few sizes for every tensor; by default glibc
    gives freed memory back (mmap for large blocks, trimming the heap top) and takes it again for the
    next tensor, and every new page costs a page fault and the kernel zeroing it: ~0.6 CPU-s of system
    time in a linear merge of two 0.5 GB models (250k faults). Blocks up to 32 MB (glibc's largest
    mmap threshold) now come from the heap, and up to 256 MB of free heap stays mapped. Peak memory
    does not grow (the kept pages are reused, not added). No effect off glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return
    mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD
    mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
