"""`surgery run --workers 2` against a serial run of the same recipe: wall and CPU time, and Ray's start-up cost.

    python benchmarks/bench_workers.py                                  # ~1.2 GB model, 2 rounds
    python benchmarks/bench_workers.py --size 0.5 --rounds 3 --workdir /tmp/bw --keep

What it does:
  1. Generates a llama-shaped family (base, a, b) of about --size GB each in bf16 (bench_engine.generate: one
     tensor in memory at a time).
  2. One recipe with all three kinds of work: a layer swap with transition zones (copies and weighted sums),
     a TIES merge of a and b over base on the middle layers, and arithmetic on the embeddings and lm_head;
     output shards of --shard-size (the unit of work of a Ray task).
  3. Runs `python -m surgery run RECIPE -o OUT --quiet --force` as a child process, serial and with
     `--workers N`, interleaved (serial, ray, serial, ray, ...), after a warm-up read of the inputs (a hot page
     cache for every run). Wall time is measured around the child; CPU time is the sum of user+system time of
     the child and all its descendants (Ray's GCS, raylet and workers), sampled every 50 ms with psutil.
  4. Checks that the two outputs' shard and index files are byte-identical.
  5. Measures Ray's own cost in a child process: `start_ray(N)` (ray.init of a local Ray), the first round of
     N empty tasks (worker processes start), and `stop_ray`.
Prints a table of medians and every run, and the load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import generate, llama_config  # noqa: E402


def recipe(family: dict[str, Path], n_layers: int, shard_size: str) -> str:
    inputs = "\n".join(f"  {k}: {v}" for k, v in family.items())
    k = max(1, n_layers // 5)
    return (f"inputs:\n{inputs}\nrecipient: a\noperations:\n"
            f"  - layer_swap: {{donor: b, bottom: {k}, top: {k}, transition: 1}}\n"
            f"  - merge:\n      method: ties\n      base: base\n"
            f"      models: {{a: {{weight: 0.6, density: 0.5}}, b: {{weight: 0.4, density: 0.5}}}}\n"
            f"      select: {{layers: '{k + 1}-{n_layers - k - 2}'}}\n"
            f"  - arithmetic: {{expr: 'a + 0.5*(b - base)', select: {{modules: [embed, lm_head]}}}}\n"
            f"output: {{shard_size: {shard_size}}}\n")


def measure(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and CPU seconds (the child and every descendant) of a command."""
    import psutil

    start = time.perf_counter()
    proc = psutil.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        try:
            procs = [proc] + proc.children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return wall, sum(cpu.values())


RAY_COST = """
import time
t0 = time.perf_counter()
from surgery.core.cluster import start_ray, stop_ray
ray, started = start_ray({n})
t1 = time.perf_counter()
noop = ray.remote(num_cpus=1)(lambda i: i)
ray.get([noop.remote(i) for i in range({n})])
t2 = time.perf_counter()
stop_ray(ray, started)
t3 = time.perf_counter()
print(f"{{t1 - t0:.2f}} {{t2 - t1:.2f}} {{t3 - t2:.2f}}")
"""


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("model*"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=1.0, help="GB of bf16 weights per model (default 1.0)")
    ap.add_argument("--shard-size", default="250MB")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-workers-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        cfg = llama_config(args.size)
        family = {}
        for seed, name in enumerate(("base", "a", "b")):
            family[name] = work / name
            if not (family[name] / "config.json").exists():
                generate(family[name], cfg, seed)
        path = work / "recipe.yaml"
        path.write_text(recipe(family, cfg["num_hidden_layers"], args.shard_size))
        for f in work.rglob("*.safetensors"):  # warm the page cache
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
        base = [sys.executable, "-m", "surgery", "run", str(path), "--quiet", "--force"]
        runs = {"serial": [], f"workers={args.workers}": []}
        for _ in range(args.rounds):
            for name, extra in (("serial", ["-o", str(work / "serial")]),
                                (f"workers={args.workers}", ["-o", str(work / "ray"), "--workers", str(args.workers)])):
                runs[name].append(measure(base + extra, env))
                print(f"{name}: {runs[name][-1][0]:.1f} s wall, {runs[name][-1][1]:.1f} CPU-s, load average "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
        same = digest(work / "serial") == digest(work / "ray")
        out = subprocess.run([sys.executable, "-c", RAY_COST.format(n=args.workers)], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        size = sum(f.stat().st_size for f in (work / "serial").glob("*.safetensors")) / 1e9
        print(f"model: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}; output {size:.2f} GB in "
              f"{len(digest(work / 'serial')) - 1} shards of <= {args.shard_size}; bytes identical: {same}")
        print(f"{'run':<12} {'wall s (median)':>16} {'CPU s (median)':>15}   every run (wall/CPU)")
        for name, got in runs.items():
            walls, cpus = [w for w, _ in got], [c for _, c in got]
            every = ", ".join(f"{w:.1f}/{c:.1f}" for w, c in got)
            print(f"{name:<12} {statistics.median(walls):>16.1f} {statistics.median(cpus):>15.1f}   {every}")
        print(f"Ray alone ({args.workers} CPUs): start {out[0]} s, first {args.workers} tasks {out[1]} s, "
              f"shutdown {out[2]} s")
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        if not same:
            raise SystemExit("the outputs differ")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
