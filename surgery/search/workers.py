"""Where trials run: in this process (default), or as Ray actors on a local or remote Ray cluster.

A pool takes resolved recipes (``submit(key, recipe)``) and hands back evaluated fidelity steps
(``results()`` -> [(key, outcome)]). Each worker builds one ``TrialEvaluator``, which loads the
data sets once and keeps one model, patched from trial to trial. A trial's worker stays its own until its last
fidelity step: ``advance(key)`` has it measure the next step on the model it holds, ``release(key)`` (a pruned
trial) frees it. Ray is imported only when ``workers`` or ``ray_address`` is given.
"""

from __future__ import annotations

import time

from surgery.core.cluster import start_ray, stop_ray
from surgery.search.config import Search
from surgery.search.objective import TrialEvaluator


def make_pool(spec: Search, *, workers: int = 0, ray_address: str | None = None):
    args = evaluator_args(spec)
    if workers or ray_address:
        return RayPool(args, workers=workers, address=ray_address)
    return SerialPool({**args, "datasets": spec.datasets})


def evaluator_args(spec: Search) -> dict:
    """What a worker needs to build its evaluator: plain data, picklable."""
    return {"objective": [t.model_dump() for t in spec.objective], "options": dict(spec.eval),
            "base_dir": str(spec.base_dir), "fidelity": list(spec.fidelity)}


class SerialPool:
    """One trial at a time, in this process."""

    def __init__(self, args: dict):
        self.evaluate = TrialEvaluator(**args)
        self.pending: list = []      # (key, recipe, step)
        self.current: tuple | None = None  # (key, step) of the trial whose steps are not all measured

    def has_room(self) -> bool:
        return not self.pending and self.current is None

    def submit(self, key: str, recipe: dict) -> None:
        self.pending.append((key, recipe, 0))

    def advance(self, key: str) -> None:
        self.pending.append((key, None, self.current[1] + 1))

    def release(self, key: str) -> None:
        self.current = None

    def results(self) -> list:
        out = []
        for key, recipe, step in self.pending:
            start = time.perf_counter()
            outcome = self.evaluate(recipe, step)
            self.current = None if outcome.get("last", True) else (key, step)
            out.append((key, {**outcome, "wall": time.perf_counter() - start}))
        self.pending = []
        return out

    def close(self) -> None:
        pass


class RayPool:
    """N Ray actors, each with its own evaluator; trials go to idle actors as they free up.

    Without ``address`` a local Ray is started for the search (N CPUs) and shut down after it;
    with one, the search joins that cluster, whose workers must see the inputs and data sets at
    the same paths (shared storage) or fetch inputs from the Hub.
    """

    def __init__(self, args: dict, *, workers: int = 0, address: str | None = None):
        ray, self.started = start_ray(workers, address)  # the same start as `surgery run --workers`
        self.ray = ray
        n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        actor = ray.remote(num_cpus=1)(RayEvaluator)
        self.idle = [actor.remote(args) for _ in range(n)]
        self.busy: dict = {}  # object ref -> (key, actor, start, step)
        self.held: dict = {}  # key -> (actor, step): a trial between two of its fidelity steps

    def has_room(self) -> bool:
        return bool(self.idle)

    def submit(self, key: str, recipe: dict) -> None:
        actor = self.idle.pop()
        self.busy[actor.evaluate.remote(recipe)] = (key, actor, time.perf_counter(), 0)

    def advance(self, key: str) -> None:
        actor, step = self.held.pop(key)
        self.busy[actor.evaluate.remote(None, step + 1)] = (key, actor, time.perf_counter(), step + 1)

    def release(self, key: str) -> None:
        self.idle.append(self.held.pop(key)[0])

    def results(self) -> list:
        if not self.busy:
            return []
        ready, _ = self.ray.wait(list(self.busy), num_returns=1)
        out = []
        for ref in ready:
            key, actor, start, step = self.busy.pop(ref)
            outcome = self.ray.get(ref)
            if outcome.get("last", True):
                self.idle.append(actor)
            else:
                self.held[key] = (actor, step)
            out.append((key, {**outcome, "wall": time.perf_counter() - start}))
        return out

    def close(self) -> None:
        for actor in self.idle + [a for _, a, _, _ in self.busy.values()] + [a for a, _ in self.held.values()]:
            self.ray.kill(actor)
        stop_ray(self.ray, self.started)


class RayEvaluator:
    """The actor class: one evaluator per worker process (data sets loaded once, one model kept and patched)."""

    def __init__(self, args: dict):
        self.evaluate_recipe = TrialEvaluator(**args)

    def evaluate(self, recipe: dict | None, step: int = 0) -> dict:
        return self.evaluate_recipe(recipe, step)
