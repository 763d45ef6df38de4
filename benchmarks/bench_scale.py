"""Issue 23: real sizes, surgery side by side with mergekit 0.1.5 and the I/O floor.

    PYTHONPATH=$PWD python benchmarks/bench_scale.py --shape 8b --layers 2 --work /tmp/bs   # a quick check
    PYTHONPATH=$PWD python benchmarks/bench_scale.py --shape 8b --jobs swap_transition,task_arithmetic,ties --resume
    PYTHONPATH=$PWD python benchmarks/bench_scale.py --shape moe --layers 8 --resume
    PYTHONPATH=$PWD python benchmarks/bench_scale.py --shape 8b --table       # the table of what is recorded
    ... --surgery-args 'ties=--threads 2' --surgery-args '*=--workers 2'       # extra flags for surgery's runs

Makes a base and two fine-tunes of the shape (bench_scale_models.py: Llama-3.1-8B or Qwen3-30B-A3B, real
names, config.json, 5 GB shards and index; --layers cuts depth, and by default depth is cut to fit
--disk-budget: 3 inputs + 1 output), measures the disk's sequential write and read throughput (dd, 4 GB),
then runs each job round robin over the tools, each a child process with the page cache dropped before it
(`echo 3 > /proc/sys/vm/drop_caches`; --warm keeps it):

  surgery   `surgery run` of the job's config (mergekit's, except the swaps: surgery recipes), or its command
  mergekit  `mergekit-yaml` of the same config, `mergekit-extract-lora` for extract_lora
  cat       the I/O floor of reading: `cat` of every input file the job reads in full, to /dev/null
  cp        the I/O floor of a copy: `cp -r` of one model

Per run: wall and CPU time (user + sys of the child and its descendants, os.wait4), peak RSS, and the
bytes read from and written to the disk (read_bytes / write_bytes of /proc/<pid>/io, read while the child is
a zombie, so they include its reaped descendants). Outputs are hashed tensor by tensor (not timed) and
removed; surgery's and mergekit's hashes are compared (fused experts, as mergekit 0.1.5 writes MoE layers,
per expert slice: bench_scale_report.digest). Every run is appended to --results (JSON) at once;
--resume skips the runs already there, so a long benchmark can be done in parts.

Jobs (L layers; a and b are the fine-tunes, base their base):
  swap_transition  layer swap, bottom 4 and top 2 layers from b, transition 1; mergekit: linear with
                   per-layer weights (the nearest mergekit job: not the same job, not compared)
  swap             the same without transition, outer tensors from b; mergekit: passthrough of slices
  linear           a, b 0.5 / 0.5
  task_arithmetic  base + 0.6 (a - base) + 0.4 (b - base)
  ties             TIES, weight 0.5, density 0.5 (exact); ties_fast: the same with --fast-kernels (compared
                   with mergekit's ties output; mergekit is not run again)
  dare_ties        DARE-TIES, weight 0.5, density 0.5, seed 42
  slerp            a, b at t 0.5
  slices           mergekit's gradient SLERP example: two slices, t per filter (self_attn, mlp) as lists
  diff             `surgery diff base a b --json` (no mergekit counterpart)
  extract_lora     `surgery extract-lora base a --rank 64` vs `mergekit-extract-lora --max-rank 64` (different
                   algorithms and outputs: not compared)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_scale_models as models  # noqa: E402
from bench_scale_report import TOOLS, digest, print_table  # noqa: E402

JOBS = ("swap_transition", "swap", "linear", "task_arithmetic", "ties", "ties_fast", "dare_ties", "slerp",
        "slices", "diff", "extract_lora")
NO_MERGEKIT_RUN = {"ties_fast": "ties", "diff": None}  # job -> the job whose mergekit output it is compared with
# the models the job must read (in full, or for the swaps about one model's worth)
READS = {"swap": ("a",), "swap_transition": ("a",), "linear": ("a", "b"), "slerp": ("a", "b"), "slices": ("a", "b"),
         "extract_lora": ("base", "a")}
NOT_COMPARED = {"swap_transition": "nearest mergekit job", "extract_lora": "different algorithms"}


def merge(method: str, p: dict[str, Path], weights=(0.5, 0.5), density: float | None = None, base=True) -> str:
    dens = f", density: {density}" if density else ""
    return (f"merge_method: {method}\n" + (f"base_model: {p['base']}\n" if base else "") + "models:\n"
            + "".join(f"  - {{model: {p[m]}, parameters: {{weight: {w}{dens}}}}}\n" for m, w in zip("ab", weights))
            + "dtype: bfloat16\n")


def configs(p: dict[str, Path], L: int) -> dict[str, dict[str, str]]:
    """job -> {tool: config text}; '*' for both tools."""
    a, b = p["a"], p["b"]
    bot, top = max(1, min(4, L // 4)), max(1, min(2, L // 8))  # 4 and 2 at 32 layers
    ramp = bot < L - top - 1  # room for transition layers between the swapped blocks
    donor = [1.0 if i < bot or i >= L - top else 0.5 if ramp and i in (bot, L - top - 1) else 0.0
             for i in range(L)]
    swap = (f"inputs: {{a: {a}, b: {b}}}\nrecipient: a\noperations:\n"
            f"  - layer_swap: {{donor: b, bottom: {bot}, top: {top}, transition: %d%s}}\n")
    outer = ", embeddings: donor, final_norm: donor, lm_head: donor"  # what mergekit's passthrough takes
    slices = "".join(f"  - sources: [{{model: {m}, layer_range: [{s}, {e}]}}]\n"
                     for m, s, e in ((b, 0, bot), (a, bot, L - top), (b, L - top, L)) if e > s)
    half = max(1, L // 2)
    grad = ("slices:\n" + "".join(f"  - sources:\n      - {{model: {a}, layer_range: [{s}, {e}]}}\n"
                                  f"      - {{model: {b}, layer_range: [{s}, {e}]}}\n"
                                  for s, e in ((0, half), (half, L)) if e > s)
            + f"merge_method: slerp\nbase_model: {a}\nparameters:\n  t:\n"
            "    - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}\n"
            "    - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}\n    - {value: 0.5}\ndtype: bfloat16\n")
    per_layer = (f"models:\n  - {{model: {a}, parameters: {{weight: {[1 - w for w in donor]}}}}}\n"
                 f"  - {{model: {b}, parameters: {{weight: {donor}}}}}\nmerge_method: linear\ndtype: bfloat16\n")
    ties = merge("ties", p, density=0.5)
    return {
        "swap_transition": {"surgery": swap % (1 if ramp else 0, ""), "mergekit": per_layer},
        "swap": {"surgery": swap % (0, outer),
                 "mergekit": f"slices:\n{slices}merge_method: passthrough\ndtype: bfloat16\n"},
        "linear": {"*": merge("linear", p, base=False)},
        "task_arithmetic": {"*": merge("task_arithmetic", p, (0.6, 0.4))},
        "ties": {"*": ties},
        "ties_fast": {"*": ties},
        "dare_ties": {"*": merge("dare_ties", p, density=0.5)},
        "slerp": {"*": f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"
                       "parameters: {t: 0.5}\ndtype: bfloat16\n"},
        "slices": {"*": grad},
    }


# Runs each command and reports its wall and CPU time, peak RSS and /proc/<pid>/io, read while the child is a
# zombie (waitid WNOWAIT): then its counters include its reaped descendants'. A launcher process, so that the
# peak RSS is the child's own, not this process's.
LAUNCHER = """
import json, os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = p.stderr.read()
os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
wall = time.perf_counter() - t
io = dict(line.split(": ") for line in open(f"/proc/{p.pid}/io").read().split("\\n") if line)
_, status, ru = os.wait4(p.pid, 0)
print(json.dumps({"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss": ru.ru_maxrss * 1024,
                  "code": os.waitstatus_to_exitcode(status), "err": err.decode(errors="replace")[-2000:],
                  **{k: int(io[k]) for k in ("read_bytes", "write_bytes", "rchar", "wchar")}}))
"""


def drop_caches(warm: bool) -> str:
    os.sync()
    if warm:
        return "warm"
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return "dropped"
    except OSError:
        return "not dropped"


def measure(cmd: list[str], warm: bool) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed packages run (mergekit's bytecode is compiled)
    cache = drop_caches(warm)
    load = os.getloadavg()[0]
    r = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"launcher failed: {r.stderr[-2000:]}")
    out = json.loads(r.stdout)
    out.update(cache=cache, load=[load, os.getloadavg()[0]], cmd=shlex.join(cmd),
               at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    return out


def disk_speed(work: Path, warm: bool, gb: int = 4) -> dict:
    """Sequential write (dd, fdatasync) and read (dd, page cache dropped) of a gb GB file, in MB/s."""
    f = work / "dd.tmp"
    w = measure(["dd", "if=/dev/zero", f"of={f}", "bs=64M", f"count={gb * 16}", "conv=fdatasync"], warm)
    r = measure(["dd", f"if={f}", "of=/dev/null", "bs=64M"], warm)
    f.unlink()
    return {"write_MBps": gb * 2**30 / w["wall"] / 1e6, "read_MBps": gb * 2**30 / r["wall"] / 1e6,
            "cache": r["cache"], "load": w["load"] + r["load"], "at": w["at"]}


def commands(job: str, tool: str, p: dict[str, Path], conf: Path, out: Path, args) -> list[str] | None:
    py, bindir = [sys.executable, "-m", "surgery"], Path(sys.executable).parent
    files = {m: sorted(str(f) for f in p[m].glob("*.safetensors")) for m in p}
    if tool == "cat":
        paths = [f for m in READS.get(job, ("base", "a", "b")) for f in files[m]]
        return ["sh", "-c", "cat " + shlex.join(paths) + " > /dev/null"]
    if tool == "cp":
        return ["cp", "-r", str(p["a"]), str(out)]
    extra = shlex.split(args.extra[tool].get(job, args.extra[tool].get("*", "")))
    if tool == "surgery":
        if job == "diff":
            return py + ["diff", str(p["base"]), f"a={p['a']}", f"b={p['b']}", "--json", "-q"] + extra
        if job == "extract_lora":
            return py + ["extract-lora", str(p["base"]), str(p["a"]), "-o", str(out), "--rank", "64", "-q"] + extra
        flags = {"ties_fast": ["--fast-kernels"], "dare_ties": ["--random-seed", "42"]}.get(job, [])
        return py + ["run", str(conf), "-o", str(out), "-q"] + flags + extra
    if job in NO_MERGEKIT_RUN:
        return None
    if job == "extract_lora":
        return [str(bindir / "mergekit-extract-lora"), "--model", str(p["a"]), "--base-model", str(p["base"]),
                "--out-path", str(out), "--max-rank", "64"] + extra
    seed = ["--random-seed", "42"] if job == "dare_ties" else []
    return [str(bindir / "mergekit-yaml"), str(conf), str(out)] + seed + extra


def pick_layers(args) -> int:
    """--layers, else the full depth if 3 inputs + 1 output fit --disk-budget, else the most that fit."""
    full = models.config(args.shape, None)["num_hidden_layers"]
    if args.layers:
        layers = args.layers
    else:
        layers = next((n for n in range(full, 0, -1) if 4 * models.model_bytes(
            models.config(args.shape, n, args.smoke)) <= args.disk_budget * 1e9), 1)
    need = 4 * models.model_bytes(models.config(args.shape, layers, args.smoke)) / 1e9
    if need > args.disk_budget:
        raise SystemExit(f"--layers {layers}: 3 inputs + 1 output need {need:.1f} GB, over --disk-budget "
                         f"{args.disk_budget:g} GB")
    return layers


def save(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=("8b", "moe"), default="8b")
    ap.add_argument("--layers", type=int, help="depth (default: the full depth, cut to fit --disk-budget)")
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated, of {', '.join(JOBS)}")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, of surgery, mergekit, cat, cp")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/surgery-bench-scale"))
    ap.add_argument("--results", type=Path, help="JSON of the runs (default: WORK/results-SHAPE-LAYERS.json)")
    ap.add_argument("--resume", action="store_true", help="keep --results and skip the runs recorded there")
    ap.add_argument("--table", action="store_true", help="only print the table of --results")
    ap.add_argument("--surgery-args", action="append", default=[], metavar="JOB=ARGS",
                    help="extra arguments for surgery's run of JOB ('*': every job); repeatable")
    ap.add_argument("--mergekit-args", action="append", default=[], metavar="JOB=ARGS")
    ap.add_argument("--disk-budget", type=float, default=60.0, help="GB for 3 inputs + 1 output (default 60)")
    ap.add_argument("--warm", action="store_true", help="keep the page cache (default: dropped before each run)")
    ap.add_argument("--smoke", action="store_true", help="1/16 of the width (same names and layout): checks the "
                    "script end to end in minutes")
    ap.add_argument("--no-check", action="store_true", help="do not hash the outputs")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()
    args.jobs = [j for j in args.jobs.split(",") if j]
    tools = [t for t in args.tools.split(",") if t]
    for bad in [j for j in args.jobs if j not in JOBS] + [t for t in tools if t not in TOOLS]:
        raise SystemExit(f"unknown job or tool {bad!r}")
    args.extra = {"surgery": dict(a.split("=", 1) for a in args.surgery_args),
                  "mergekit": dict(a.split("=", 1) for a in args.mergekit_args)}
    layers = pick_layers(args)
    tag = f"{args.shape}-{layers}" + ("-smoke" if args.smoke else "")
    work = args.work / tag
    results = args.results or args.work / f"results-{tag}.json"
    records = json.loads(results.read_text()) if results.exists() and (args.resume or args.table) else []
    title = f"{args.shape}, {layers} layers" + (" (smoke: 1/16 width)" if args.smoke else "")
    if args.table:
        print_table(records, NOT_COMPARED, NO_MERGEKIT_RUN, title)
        return
    work.mkdir(parents=True, exist_ok=True)
    cfg = models.config(args.shape, layers, args.smoke)
    print(f"# {title}: 3 x {models.model_bytes(cfg) / 1e9:.2f} GB in {work}; results in {results}", flush=True)
    t = time.perf_counter()
    if not all((work / "models" / m / "done").exists() for m in ("base", "a", "b")):
        free = shutil.disk_usage(work).free / 1e9
        if free < 4 * models.model_bytes(cfg) / 1e9:
            raise SystemExit(f"{work}: {free:.0f} GB free, 3 inputs + 1 output need "
                             f"{4 * models.model_bytes(cfg) / 1e9:.0f} GB")
    paths = models.generate(work / "models", cfg, log=lambda m: print(m, flush=True))
    if not any(r.get("kind") == "generate" for r in records):
        records.append({"kind": "generate", "seconds": time.perf_counter() - t,
                        "GB": 3 * models.model_bytes(cfg) / 1e9})
    if not any(r.get("kind") == "hash" for r in records):  # surgery's input-hash cache, warmed as in bench_perf
        files = [str(f) for q in paths.values() for f in sorted(q.glob("*.safetensors"))]
        r = measure([sys.executable, "-c", "import sys; from surgery.io.checkpoint import sha256_file\n"
                     "for f in sys.argv[1:]: sha256_file(f)", *files], args.warm)
        records.append({"kind": "hash", "seconds": r["wall"], "cpu": r["cpu"], "GB": r["rchar"] / 1e9})
    if not any(r.get("kind") == "disk" for r in records):
        records.append({"kind": "disk", **disk_speed(work, args.warm, 1 if args.smoke else 4)})
    save(results, records)
    print(records[-1], flush=True)
    done = {(r["job"], r["tool"], r["rep"]) for r in records if r.get("kind") == "run"}
    texts = configs(paths, layers)
    out = work / "out"
    for rep in range(args.repeats):
        for job in args.jobs:
            for tool in tools:
                conf = work / f"{job}-{tool}.yaml"
                if (job, tool, rep) in done:
                    continue
                if job in texts and tool in ("surgery", "mergekit"):
                    conf.write_text(texts[job].get(tool, texts[job].get("*")))
                cmd = commands(job, tool, paths, conf, out, args)
                if cmd is None:
                    continue
                shutil.rmtree(out, ignore_errors=True)
                rec = {"kind": "run", "job": job, "tool": tool, "rep": rep, **measure(cmd, args.warm)}
                rec["status"] = "ok" if not rec["code"] else (rec["err"].strip().splitlines() or ["?"])[-1][:300]
                if not rec["code"] and tool in ("surgery", "mergekit") and out.exists() and not args.no_check \
                        and job not in NOT_COMPARED:
                    rec["digest"] = digest(out)
                shutil.rmtree(out, ignore_errors=True)
                records.append(rec)
                save(results, records)
                print(f"  {job} {tool} rep {rep + 1}: {rec['wall']:.1f} s, {rec['cpu']:.1f} CPU-s, "
                      f"{rec['rss'] / 2**30:.2f} GB RSS, read {rec['read_bytes'] / 1e9:.1f} GB, written "
                      f"{rec['write_bytes'] / 1e9:.1f} GB, load {rec['load'][0]:.1f}-{rec['load'][1]:.1f}, "
                      f"{rec['status']}", flush=True)
    print_table(records, NOT_COMPARED, NO_MERGEKIT_RUN, title)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
