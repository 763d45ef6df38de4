"""docs/methods.md's cost table: seconds per GB of merged output for surgery's own merge methods (tsv_m, iso_c,
iso_cts, lines, consensus) against task arithmetic, one block matrix at a time through ``surgery.merge.compute``.

    python benchmarks/bench_methods.py                                # 1024x1024 and 1024x2816, 3 tasks, 1 thread
    python benchmarks/bench_methods.py --shapes 4096x4096 --tasks 4 --threads 8 --device cuda

bfloat16 inputs (base + small noise per task); each method runs once to warm up, then is timed once. The SVD
methods cost O(rows x cols x min(rows, cols)) per task: per GB they grow with the hidden size.
"""

from __future__ import annotations

import argparse
import time

METHODS = (("task_arithmetic", {}), ("tsv_m", {}), ("iso_c", {}), ("iso_cts", {}),
           ("lines", {"base_method": "task_arithmetic", "alpha": 0.5, "beta": 1.0}),
           ("consensus", {"base_method": "task_arithmetic"}))


def node(method: str, shared: dict, tasks: int) -> dict:
    ids = [f"m{i}" for i in range(tasks)] + ["base"]
    weighted = method in ("task_arithmetic", "lines", "consensus")
    per_input = {i: ({"weight": 1.0} if weighted else {}) for i in ids[:-1]} | {"base": {}}
    return {"method": method, "ids": ids, "base_index": tasks, "shared": dict(shared), "per_input": per_input,
            "dtype": None, "name": "model.layers.3.mlp.up_proj.weight", "seed": None, "kernel": "exact",
            "layer": 3, "layers": 8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1024x1024,1024x2816")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import torch

    from surgery import merge
    from surgery.core import devices

    torch.manual_seed(0)
    with devices.compute_context(devices.resolve_device(args.device), args.threads):
        for shape in [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]:
            base = torch.randn(*shape).to(torch.bfloat16)
            tensors = [(base.float() + 0.01 * torch.randn(*shape)).to(torch.bfloat16) for _ in range(args.tasks)]
            tensors.append(base)
            gb = base.numel() * 2 / 1e9
            for method, shared in METHODS:
                p = node(method, shared, args.tasks)
                merge.compute(tensors, p)
                t0 = time.perf_counter()
                merge.compute(tensors, p)
                dt = time.perf_counter() - t0
                print(f"{shape[0]}x{shape[1]}  T={args.tasks}  {method:16s} {dt * 1000:9.1f} ms "
                      f"{dt / gb:9.1f} s/GB", flush=True)


if __name__ == "__main__":
    main()
