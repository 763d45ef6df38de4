"""Multi-fidelity evaluation: the objective's data measured on growing subsets, step by step.

    steps = fidelity_steps(datasets, [0.125, 0.25, 0.5, 1], seed=0)   # per step: the items it adds
    totals = Totals()
    for part in steps:
        totals.add(measure_part(model, tokenizer, part, options))
        totals.metrics()       # {data: {metric: value}} on every item seen so far

Each data set's items are put in one order drawn with the seed (the same for every trial, so trials are compared
on the same items); step k covers the first ``ceil(fraction_k * n)`` of them and evaluates only those the step
before did not. Metrics add up exactly: perplexity and bits per byte from summed log-likelihoods, tokens and
bytes; match rates and accuracies from counts. The last step (fraction 1) covers every item: its value is the
full evaluation's up to the order of a floating-point sum.
"""

from __future__ import annotations

import math
import random

from surgery.eval.data import Dataset

COUNTED = {"generation": ("exact_match", "numeric_match"), "choice": ("acc", "acc_norm")}


def fidelity_steps(datasets: list[Dataset], fractions: list[float], seed: int = 0) -> list[list[Dataset]]:
    """Per step, the items of each data set it adds to the previous steps' (a data set may add none)."""
    steps = [[] for _ in fractions]
    for ds in datasets:
        order = random.Random(seed).sample(range(len(ds.items)), len(ds.items))
        begin = 0
        for k, fraction in enumerate(fractions):
            end = len(order) if fraction >= 1 else min(len(order), max(1, math.ceil(fraction * len(order))))
            if end > begin:
                steps[k].append(Dataset(ds.name, ds.kind, [ds.items[i] for i in sorted(order[begin:end])], ds.path))
            begin = max(begin, end)
    return steps


def measure_part(model, tokenizer, part: list[Dataset], options: dict) -> dict:
    """{data name: (kind, sums)} of one step's items: perplexity sums, or counts and the item count."""
    from surgery.eval import metrics

    batch = options.get("batch_size", 8)
    out = {}
    for ds in part:
        if ds.kind == "text":
            out[ds.name] = ("text", metrics.perplexity_sums(model, tokenizer, ds.items, batch_size=batch,
                                                            max_length=options.get("max_length")))
            continue
        if ds.kind == "generation":
            means = metrics.generation(model, tokenizer, ds.items, max_new_tokens=options.get("max_new_tokens", 64),
                                       batch_size=batch, chat=options.get("chat", False))
        else:
            means = metrics.multiple_choice(model, tokenizer, ds.items, batch_size=batch,
                                            max_length=options.get("max_length"))
        n = len(ds.items)
        out[ds.name] = (ds.kind, {**{m: round(means[m] * n) for m in COUNTED[ds.kind]}, "items": n})
    return out


class Totals:
    """The sums of the steps measured so far, per data set."""

    def __init__(self):
        self.sums: dict[str, tuple[str, dict]] = {}

    def add(self, part: dict) -> None:
        for name, (kind, sums) in part.items():
            _, held = self.sums.setdefault(name, (kind, {k: 0 for k in sums}))
            for k, v in sums.items():
                held[k] += v

    def metrics(self) -> dict[str, dict[str, float]]:
        from surgery.eval.metrics import perplexity_of

        out = {}
        for name, (kind, sums) in self.sums.items():
            if kind == "text":
                out[name] = perplexity_of(sums)
            else:
                out[name] = {m: sums[m] / max(sums["items"], 1) for m in COUNTED[kind]}
        return out
