"""How many threads torch computes with: the one place that sets it.

    set_threads(None)      # the default policy (what every computing command does without --threads)
    set_threads(4)         # --threads 4
    with one_thread(): ... # a computation whose bytes must not depend on the thread count

Default policy: ``SURGERY_THREADS`` if set; else torch's own setting if ``OMP_NUM_THREADS`` is set;
else the cores this process may use minus the machine's current load (1-minute load average),
at least 1. On a busy machine torch's default (one thread per core) makes every thread wait at
barriers for cores other processes hold: on a loaded 2-core machine an SVD took 5-14 s with two
threads against 1.3 s with one.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from surgery.errors import SurgeryError


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int | None:
    """The thread count the policy picks, or None to leave torch's setting (OMP_NUM_THREADS) alone."""
    env = os.environ.get("SURGERY_THREADS")
    if env:
        return parse_threads(env, "SURGERY_THREADS")
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def parse_threads(value, where: str = "--threads") -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise SurgeryError(f"{where}: expected a number of threads >= 1, got {value!r}") from None
    if n < 1:
        raise SurgeryError(f"{where}: expected a number of threads >= 1, got {value!r}")
    return n


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to ``n``, or by the default policy when ``n`` is None; return the count."""
    import torch

    n = parse_threads(n) if n is not None else default_threads()
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()


@contextmanager
def one_thread():
    """Run the block on one torch thread: a reduction (a sum, a norm) split over threads rounds
    differently for each thread count; on one thread its bytes are the same on any machine of a kind."""
    import torch

    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)
