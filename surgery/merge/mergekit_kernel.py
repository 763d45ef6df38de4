"""mergekit's own kernels (``mergekit.merge_methods.api.merge_tensors``): the backend of every method mergekit has,
and the reference every other backend is tested against."""

from __future__ import annotations

import functools

from surgery.merge.backend import Backend


def run(tensors: list, p: dict, parameters: dict):
    """``merge_tensors`` on one torch thread, with the node's seed for random methods.

    One thread: mergekit's whole-tensor sums and norms (DARE's and DELLA's rescale, model_stock's cosines) round
    differently for each thread count, and seeded results must not depend on the machine's cores."""
    import torch
    from mergekit.merge_methods.api import merge_tensors

    from surgery.core.threads import one_thread

    def call():
        return merge_tensors(tensors, p["method"], parameters=parameters, ids=p["ids"], base_index=p["base_index"],
                             name=p["name"])

    with one_thread():
        if p.get("seed") is None:
            return call()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p["seed"])
            return call()


@functools.lru_cache(maxsize=None)
def backend(method: str) -> Backend:
    return Backend(method, "mergekit", run, exact="the reference", devices=("*",))
