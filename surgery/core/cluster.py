"""Ray, started or joined one way for every command that spreads work (`surgery run`, `surgery search`).

    ray, started = start_ray(workers=2)            # a local Ray with 2 CPUs
    ray, started = start_ray(address="auto")       # or join a running cluster ('auto', host:port, ray://...)
    ...
    stop_ray(ray, started)                         # shuts down only a Ray this process started

Ray is imported here only, and only when asked for: an optional extra (``pip install 'surgery[search]'``).
"""

from __future__ import annotations

import socket

from surgery.errors import SurgeryError

CONNECT_TIMEOUT_S = 10  # how long the head of a cluster may take to accept a connection


def start_ray(workers: int = 0, address: str | None = None):
    """``(ray, started)``: Ray ready for tasks. A Ray already initialised in this process is used as it is
    (``started`` False); else ``address`` is joined, or a local Ray with ``workers`` CPUs (at least 1)
    is started. A missing Ray, a bad address or a failed start is one SurgeryError."""
    if workers < 0:
        raise SurgeryError(f"--workers takes a count >= 1, got {workers}")
    try:
        import ray
    except ImportError:
        raise SurgeryError("--workers/--ray-address need Ray: pip install 'surgery[search]' (or ray>=2.9)") from None
    if ray.is_initialized():
        return ray, False
    kwargs = {"address": address} if address else {"num_cpus": max(workers, 1)}
    if address:
        check_reachable(address)
    try:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
    except Exception as e:  # ConnectionError, ValueError, RuntimeError, grpc errors: all say the same to a user
        where = f" at {address}" if address else ""
        raise SurgeryError(f"cannot start or join Ray{where}: {first_line(e)}") from None
    return ray, True


def check_reachable(address: str) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) nothing listens on: Ray itself retries such an
    address for minutes. 'auto' and addresses without a port are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise SurgeryError(f"cannot join Ray at {address}: {e.strerror or e} (is a Ray head running there?)") from None


def stop_ray(ray, started: bool) -> None:
    if started:
        ray.shutdown()


def task_error(ray, e: Exception, what: str) -> SurgeryError:
    """One line for an error raised by ``ray.get``: a task's own SurgeryError as it is, anything else (a crash,
    a lost worker, a bug) named with ``what`` (e.g. 'the task writing model-00002-of-00004.safetensors')."""
    cause = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
    if isinstance(cause, SurgeryError):
        return SurgeryError(str(cause))
    cause = cause or e
    return SurgeryError(f"{what} failed on Ray: {type(cause).__name__}: {first_line(cause)}")


def first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
