"""One plan over several Ray workers, split by output shard (`surgery run --workers N | --ray-address ADDR`).

    ray, started = start_ray(workers=2)          # a local Ray with 2 CPUs (or address="auto": a cluster)
    files = execute_on_ray(plan, folder, ray, workers=2)
    stop_ray(ray, started)

The plan goes into Ray's object store once; each task gets it with the index of one output shard, reads only
the byte ranges of that shard's tensors (positioned reads, kernel copies: ``core.execute.execute(shards=...)``)
and writes that shard file into ``folder``. This process, the coordinator, writes the index when every task
has succeeded. The shard layout is a function of the plan alone (``execute.shard_specs``,
``io.writer.shard_layout``), so the tasks and a serial run cut the same shards, and the files are byte for byte
a serial run's. A task whose worker died is run again (it rewrites its shard from the start); a task that fails
cancels the others and is one SurgeryError; ``folder`` is then incomplete (the
caller's atomic output directory removes it). On a cluster, the inputs and ``folder`` must be at the same
paths on every node (shared storage).
"""

from __future__ import annotations

from pathlib import Path

from surgery.core import devices
from surgery.core.cluster import task_error
from surgery.core.execute import _progress, execute, shard_specs
from surgery.core.plan import Plan
from surgery.errors import SurgeryError
from surgery.io.writer import shard_layout, shard_names, write_index

MAX_RETRIES = 3  # Ray's default for tasks whose worker died
CANCEL_WAIT_S = 30  # how long cancelled tasks may take to stop before the coordinator goes on


def execute_on_ray(plan: Plan, folder: Path, ray, *, workers: int = 0, quiet: bool = True,
                   allow_nonfinite: bool = False) -> list[str]:
    """Write ``plan``'s shards into ``folder`` as tasks of ``ray`` (``core.cluster.start_ray``), at most
    ``workers`` at once (0: as many as the cluster runs); return the shard file names. Like ``execute``, it
    sets ``devices.threads_used``: the torch threads the tasks computed with (None: no tensor was computed)."""
    specs, max_bytes = shard_specs(plan)
    layout = shard_layout(specs, max_bytes)
    names = shard_names(len(layout))
    sizes = [sum(meta.nbytes for _, meta in shard) for shard in layout]
    running: dict = {}  # object ref -> shard index
    threads = None
    try:
        # a lost worker (a crash, Ray's out-of-memory killer) is retried, as Ray does by default: a task writes
        # its shard from the start, the same bytes; a task's own error (retry_exceptions=False) is not
        task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(write_shard)
        plan_ref = ray.put(plan)
        todo = list(range(len(layout)))[::-1]
        limit = workers or len(layout)
        with _progress(plan.total_bytes, quiet) as bar:
            while todo or running:
                while todo and len(running) < limit:
                    i = todo.pop()
                    running[task.remote(plan_ref, str(folder), i, allow_nonfinite, devices.executor_threads(),
                                        devices.backend())] = i
                ready, _ = ray.wait(list(running), num_returns=1)
                i = running.pop(ready[0])
                try:
                    written, used = ray.get(ready[0])
                except Exception as e:  # a task's SurgeryError, a crash, a lost worker: ray.exceptions.RayError
                    raise task_error(ray, e, f"the task writing {folder / names[i]}") from None
                if written != [names[i]]:
                    raise SurgeryError(f"internal: the task for shard {i} wrote {written}, planned {names[i]}")
                threads = max(threads or 0, used or 0) or None
                bar.update(sizes[i])
    finally:
        _cancel(ray, running)
    if len(layout) > 1:
        write_index(folder, layout)
    devices.threads_used = threads
    return names


def write_shard(plan: Plan, folder: str, shard: int, allow_nonfinite: bool, threads: int | None,
                backend: str = "auto"):
    """The Ray task: write shard ``shard`` of ``plan`` into ``folder``; ``(files written, torch threads)``.
    ``threads`` and ``backend``: the coordinator's settings (``core.devices``), which a worker process lacks."""
    devices.request_threads(threads)
    try:
        with devices.use_backend(backend):
            files = execute(plan, Path(folder), allow_nonfinite=allow_nonfinite, shards=[shard])
    finally:
        for source in plan.inputs.values():
            source.close()
    return files, devices.threads_used


def _cancel(ray, running: dict) -> None:
    """Stop the tasks still running (after a failure, or an interrupt) before their folder is removed."""
    if not running:
        return
    for ref in running:
        ray.cancel(ref, force=True)
    ray.wait(list(running), num_returns=len(running), timeout=CANCEL_WAIT_S)
    running.clear()
