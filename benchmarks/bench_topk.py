"""Issue 11: the exact TIES top-k (which k entries mergekit's argsort keeps) three ways, interleaved, medians of
wall and CPU time over --repeats runs, on bf16 fine-tune deltas (base + noise, minus base: heavy ties).

    PYTHONPATH=. python benchmarks/bench_topk.py                 # 33M (a 32000 x 1024 embedding) and 6M entries
    PYTHONPATH=. python benchmarks/bench_topk.py --sizes 1000000 --repeats 3

  argsort  mergekit.sparsify.magnitude's way: argsort(|delta|.float(), descending=True)[:k] into a mask
  numpy    surgery.merge.topk's numpy replay of introsort's partitions (SURGERY_BACKEND=numpy)
  native   the same replay compiled (surgery/operations/_introsort.c; `python setup.py build_ext --inplace`)

Each run starts from the bf16 delta (|delta| as int16 keys for the replays, as float32 for argsort) and ends with
the bool mask; the three masks are checked equal. torch runs on one thread, as the replays do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def delta(n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(n, generator=g)
    return (base + 0.002 * torch.randn(n, generator=g)).bfloat16() - base.bfloat16()


def by_argsort(d, k: int):
    import torch

    w = d.abs().view(-1).float()
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[torch.argsort(w, descending=True)[:k]] = True
    return mask.numpy()


def by_replay(d, k: int, native: bool):
    from surgery.merge.topk import magnitude_keys, top_k_mask_numpy

    os.environ["SURGERY_BACKEND"] = "auto" if native else "numpy"
    return top_k_mask_numpy(magnitude_keys(d).numpy(), k)  # magnitude_keys makes a fresh tensor: ours to reorder


def main():
    import numpy as np
    import torch

    from surgery.merge import topk as introsort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="32768000,5767168", help="comma-separated entry counts")
    ap.add_argument("--density", type=float, default=0.5, help="k = density * n, as TIES")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if introsort._native() is None:
        sys.exit("the compiled kernel is not built: python setup.py build_ext --inplace")
    torch.set_num_threads(1)
    tools = {"argsort": lambda d, k: by_argsort(d, k), "numpy": lambda d, k: by_replay(d, k, False),
             "native": lambda d, k: by_replay(d, k, True)}
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        d, k = delta(n), int(args.density * n)
        times = {t: [] for t in tools}
        for rep in range(args.repeats):
            masks = {}
            for name, fn in tools.items():
                w, c = time.perf_counter(), time.process_time()
                masks[name] = fn(d, k)
                times[name].append((time.perf_counter() - w, time.process_time() - c))
            if not (np.array_equal(masks["argsort"], masks["numpy"]) and np.array_equal(masks["argsort"],
                                                                                         masks["native"])):
                sys.exit(f"n={n}: the kept entries differ")
        med = {t: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for t, v in times.items()}
        rows.append((n, med))
    print(f"{'entries':>10} {'tool':<8}{'wall s':>8}{'cpu s':>8}{'argsort/it wall':>17}{'cpu':>6}"
          f"{'numpy/it wall':>15}{'cpu':>6}")
    for n, med in rows:
        for t, (w, c) in med.items():
            aw, ac = med["argsort"]
            nw, nc = med["numpy"]
            print(f"{n:>10} {t:<8}{w:>8.3f}{c:>8.3f}{aw / w:>17.2f}{ac / c:>6.2f}{nw / w:>15.2f}{nc / c:>6.2f}")
    print(f"(medians of {args.repeats}, interleaved; k = {args.density} n; masks equal in every run)")


if __name__ == "__main__":
    main()
