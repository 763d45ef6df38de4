"""Issue 11: where the fixed start-up of `surgery run` goes, against `cp -r`, on the 0.5 GB layer swap.

    PYTHONPATH=$PWD python benchmarks/bench_startup.py --repeats 7
    PYTHONPATH=$PWD python benchmarks/bench_startup.py --workdir /tmp/p11w   # reuse bench_perf.py's checkpoints

Each row is a fresh process, the rows run round robin (row 1..N, then the next repeat), medians of CPU time
(user + sys of the child) and wall time. The import rows are cumulative: each adds what the next layer of a
`surgery run` process needs, so their differences are what that layer costs. The last lines put the floor
(interpreter + click + PyYAML + pydantic, before any surgery module) beside the copy that `cp -r` makes.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_perf import configs, generate, llama_config  # noqa: E402 - the same checkpoints and swap recipe

STDLIB = "import json, pathlib, concurrent.futures, dataclasses, threading"
IMPORTS = [  # (row, code): cumulative
    ("python -c pass", "pass"),
    ("+ click, PyYAML, stdlib", f"{STDLIB}; import click, yaml"),
    ("+ pydantic BaseModel", f"{STDLIB}; import click, yaml; from pydantic import BaseModel"),
    ("+ surgery.cli, surgery.pipeline", "import surgery.cli, surgery.pipeline"),
]


def measure(cmd: list[str], env: dict) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/surgery-bench-perf"))
    args = ap.parse_args()
    cfg = llama_config(0.5)
    work = args.workdir / "0.5gb"
    paths = generate(work / "models", cfg)
    recipe = work / "swap-startup.yaml"
    recipe.write_text(configs(paths, cfg["num_hidden_layers"])["swap"]["surgery"])
    out = work / "out-startup"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed packages run: bytecode cached
    rows = [(name, [sys.executable, "-c", code]) for name, code in IMPORTS]
    rows += [("surgery validate (imports + recipe)", [sys.executable, "-m", "surgery", "validate", str(recipe)]),
             ("surgery run (the swap)", [sys.executable, "-m", "surgery", "run", str(recipe), "-o", str(out), "-q"]),
             ("cp -r (the recipient)", ["cp", "-r", str(paths["a"]), str(out)])]
    results: dict[str, list] = {name: [] for name, _ in rows}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, cmd in rows:
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            results[name].append(measure(cmd, env))
            load.append(os.getloadavg()[0])
    shutil.rmtree(out, ignore_errors=True)
    med = {n: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r)) for n, r in results.items()}
    print(f"# medians of {args.repeats}; load average (1 min) {min(load):.1f}-{max(load):.1f} "
          f"on {os.cpu_count()} CPUs\n")
    print("| process | wall s | CPU s |\n|---|---:|---:|")
    for name, (wall, cpu) in med.items():
        print(f"| {name} | {wall:.3f} | {cpu:.3f} |")
    cp_wall = med["cp -r (the recipient)"][0]
    floor = med["+ pydantic BaseModel"][1] + cp_wall
    print(f"\nsurgery run / cp -r (wall): {med['surgery run (the swap)'][0] / cp_wall:.2f}x")
    print(f"floor with pydantic (its imports' CPU + the copy's wall): {floor:.3f} s = {floor / cp_wall:.2f}x cp -r")
    no_pydantic = med["+ click, PyYAML, stdlib"][1] + cp_wall
    print(f"floor without pydantic (click + PyYAML + the copy): {no_pydantic:.3f} s "
          f"= {no_pydantic / cp_wall:.2f}x cp -r")


if __name__ == "__main__":
    main()
