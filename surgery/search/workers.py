"""Where trials run: in this process (default), or as Ray actors on a local or remote Ray cluster.

A pool takes resolved recipes (``submit(key, recipe)``) and hands back finished evaluations
(``results()`` -> [(key, outcome)]). Each worker builds one ``TrialEvaluator``, which loads the
data sets once and then evaluates every recipe it is given in memory. Ray is imported only when
``workers`` or ``ray_address`` is given.
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
            "base_dir": str(spec.base_dir)}


class SerialPool:
    """One trial at a time, in this process."""

    def __init__(self, args: dict):
        self.evaluate = TrialEvaluator(**args)
        self.pending: list = []

    def has_room(self) -> bool:
        return not self.pending

    def submit(self, key: str, recipe: dict) -> None:
        self.pending.append((key, recipe))

    def results(self) -> list:
        out = []
        for key, recipe in self.pending:
            start = time.perf_counter()
            outcome = self.evaluate(recipe)
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
        self.busy: dict = {}  # object ref -> (key, actor)

    def has_room(self) -> bool:
        return bool(self.idle)

    def submit(self, key: str, recipe: dict) -> None:
        actor = self.idle.pop()
        self.busy[actor.evaluate.remote(recipe)] = (key, actor, time.perf_counter())

    def results(self) -> list:
        if not self.busy:
            return []
        ready, _ = self.ray.wait(list(self.busy), num_returns=1)
        out = []
        for ref in ready:
            key, actor, start = self.busy.pop(ref)
            self.idle.append(actor)
            out.append((key, {**self.ray.get(ref), "wall": time.perf_counter() - start}))
        return out

    def close(self) -> None:
        for actor in self.idle + [a for _, a, _ in self.busy.values()]:
            self.ray.kill(actor)
        stop_ray(self.ray, self.started)


class RayEvaluator:
    """The actor class: one evaluator per worker process (data sets loaded once)."""

    def __init__(self, args: dict):
        self.evaluate_recipe = TrialEvaluator(**args)

    def evaluate(self, recipe: dict) -> dict:
        return self.evaluate_recipe(recipe)
