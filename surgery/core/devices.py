"""Where the executor's math runs: the device for merge operations and the CPU threads torch may use.

    device = resolve_device("auto")          # "cuda" when torch sees a GPU, else "cpu"
    with compute_context(device):            # what `execute` does around the tensors it computes
        current_device()                     # -> "cuda": merge operations move their inputs there

CPU threads: the executor runs torch's own (OpenMP) operations on ONE thread. Its elementwise math is
memory-bound and already overlaps reading and writing; OpenMP's idle workers spin between the many
small operations and, measured on a 2-core machine, burned 3x the CPU time of the math itself
(linear merge of two 0.5 GB models: 16 CPU-s with 2 threads, 4 with 1). Work that does parallelise
(TIES's per-model sparsification) uses its own thread pool (``surgery.operations.merge_kernels``).
"""

from __future__ import annotations

import contextlib
import contextvars

from surgery.errors import SurgeryError

DEVICES = ("cpu", "cuda", "auto")
_device: contextvars.ContextVar[str] = contextvars.ContextVar("surgery_device", default="cpu")


def resolve_device(name: str | None) -> str:
    """'cpu', 'cuda' or 'auto' -> the torch device merge math runs on. torch is imported only for cuda/auto."""
    name = name or "cpu"
    if name not in DEVICES:
        raise SurgeryError(f"unknown device {name!r} (expected one of: {', '.join(DEVICES)})")
    if name == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if name == "cuda":
        raise SurgeryError("device 'cuda': torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                           "use --device auto or cpu")
    return "cpu"


def current_device() -> str:
    """The device merge operations compute on (set by ``compute_context``; 'cpu' outside it)."""
    return _device.get()


@contextlib.contextmanager
def compute_context(device: str = "cpu", threads: int = 1):
    """Set the merge device and torch's intra-op thread count for the block, then restore both."""
    import torch

    before = torch.get_num_threads()
    token = _device.set(device)
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        _device.reset(token)
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def one_thread() -> None:
    """Run torch's operations in the calling thread on one OpenMP thread (the setting is per thread)."""
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
