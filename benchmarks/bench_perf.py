"""Issue 11: surgery vs mergekit 0.1.5 vs `cp -r`, whole processes, interleaved, medians of wall and CPU time.

    python benchmarks/bench_perf.py                          # 0.5 GB, 3 repeats
    python benchmarks/bench_perf.py --sizes 0.5,2 --repeats 3 --jobs linear,ties
    python benchmarks/bench_perf.py --generate-only          # just make the checkpoints

Per size it generates three bf16 llama checkpoints under --workdir (a base and two fine-tunes: base +
small noise), warms the page cache and surgery's input-hash cache, then runs every job, round robin
over the tools (surgery, mergekit-yaml, cp -r) and the repeats, each as a child process measured with
os.wait4: wall time, CPU time (user + sys of the child and its children) and peak RSS. The table shows
medians and the ratios mergekit / surgery (above 1: surgery is faster or smaller) and surgery / cp.
Outputs of the first repeat are compared tensor by tensor (surgery vs mergekit). The checkpoints are
deleted at the end unless --keep.

Jobs (the layer count L is fitted to the size; bottom 4, top 2 as in the issue):
  swap_transition  layer swap bottom 4, top 2, transition 1; mergekit: linear with per-layer weights
  swap             the same without transition, outer tensors from the donor too; mergekit: passthrough of
                   slices (which takes the embeddings, final norm and lm_head from the first slice's model)
  linear           linear, 2 models, weights 0.5/0.5 (the same mergekit config for both tools)
  task_arithmetic  2 models + base, weights 0.6/0.4
  ties             TIES, 2 models + base, weight 0.5, density 0.5, exact (mergekit's argsort order)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_engine import llama_tensors  # noqa: E402 - the same llama tensor names and shapes
VOCAB = 32000
SHAPES = {  # hidden, intermediate, heads, kv heads; layers fitted to the size
    0.5: dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=8),
    2: dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=8),
}
JOBS = ("swap_transition", "swap", "linear", "task_arithmetic", "ties")


def llama_config(size_gb: float) -> dict:
    p = dict(SHAPES[0.5 if size_gb < 1 else 2])
    h, i = p["hidden_size"], p["intermediate_size"]
    kv = h // p["num_attention_heads"] * p["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    layers = max(8, round((size_gb * 1e9 / 2 - 2 * VOCAB * h - h) / per_layer))
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
            "num_hidden_layers": layers, **p, "hidden_act": "silu", "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2}


def generate(folder: Path, cfg: dict) -> dict[str, Path]:
    """base, a, b: random bf16 tensors, a and b = base + noise (fine-tunes), one tensor in memory at a time."""
    import torch

    from surgery.io.safetensors import TensorMeta
    from surgery.io.writer import ShardedWriter

    paths = {n: folder / n for n in ("base", "a", "b")}
    if all((p / "done").exists() for p in paths.values()):
        return paths
    specs = [(n, TensorMeta("BF16", s)) for n, s in llama_tensors(cfg)]
    writers = {}
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
        (p / "config.json").write_text(json.dumps(cfg, indent=2))
        writers[p] = ShardedWriter(p, specs, 2 * 10**9).__enter__()
    gen = torch.Generator().manual_seed(0)
    for name, meta in specs:
        base = (1 + 0.1 * torch.randn(meta.shape, generator=gen)) if len(meta.shape) == 1 else \
            0.02 * torch.randn(meta.shape, generator=gen)
        for n, p in paths.items():
            t = base if n == "base" else base + 0.002 * torch.randn(meta.shape, generator=gen)
            writers[p].write(name, t.to(torch.bfloat16))
        del base, t
    for p, w in writers.items():
        w.__exit__(None, None, None)
        (p / "done").write_text("")
    return paths


def configs(paths: dict[str, Path], layers: int) -> dict[str, dict[str, str]]:
    """job -> {tool: config text}; surgery reads mergekit configs too, except for the swaps (its own recipes)."""
    a, b, base = paths["a"], paths["b"], paths["base"]
    donor = [1.0 if i < 4 or i >= layers - 2 else 0.5 if i in (4, layers - 3) else 0.0 for i in range(layers)]
    swap = (f"inputs: {{a: {a}, b: {b}}}\nrecipient: a\noperations:\n"
            f"  - layer_swap: {{donor: b, bottom: 4, top: 2, transition: %d%s}}\n")
    outer = ", embeddings: donor, final_norm: donor, lm_head: donor"  # what mergekit's passthrough takes
    slices = "".join(f"  - sources: [{{model: {m}, layer_range: [{s}, {e}]}}]\n"
                     for m, s, e in ((b, 0, 4), (a, 4, layers - 2), (b, layers - 2, layers)))
    return {
        "swap_transition": {"surgery": swap % (1, ""), "mergekit": (
            f"models:\n  - {{model: {a}, parameters: {{weight: {[1 - w for w in donor]}}}}}\n"
            f"  - {{model: {b}, parameters: {{weight: {donor}}}}}\nmerge_method: linear\ndtype: bfloat16\n")},
        "swap": {"surgery": swap % (0, outer),
                 "mergekit": f"slices:\n{slices}merge_method: passthrough\ndtype: bfloat16\n"},
        "linear": {"*": f"models:\n  - {{model: {a}, parameters: {{weight: 0.5}}}}\n"
                        f"  - {{model: {b}, parameters: {{weight: 0.5}}}}\nmerge_method: linear\n"},
        "task_arithmetic": {"*": f"models:\n  - {{model: {a}, parameters: {{weight: 0.6}}}}\n"
                                 f"  - {{model: {b}, parameters: {{weight: 0.4}}}}\n"
                                 f"merge_method: task_arithmetic\nbase_model: {base}\n"},
        "ties": {"*": f"models:\n  - {{model: {a}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
                      f"  - {{model: {b}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
                      f"merge_method: ties\nbase_model: {base}\n"},
    }


# A small launcher runs each command, so the child's peak RSS is its own: a child forked from this process
# (which has imported torch) would report this process's pages in ru_maxrss.
LAUNCHER = """
import os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = p.stderr.read()
_, status, ru = os.wait4(p.pid, 0)
wall = time.perf_counter() - t
code = os.waitstatus_to_exitcode(status)
if code:
    sys.stderr.write(err.decode()[-3000:])
    sys.exit(code)
print(wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024)
"""


def measure(cmd: list[str]) -> dict:
    """Wall, CPU (user + sys of the child and its waited-for children) and peak RSS of one child process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    # as installed packages run: bytecode cached (mergekit's was compiled by pip; without this, every surgery
    # process would recompile its own modules, ~0.15 CPU-s)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    r = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    wall, cpu, rss = r.stdout.split()
    return {"wall": float(wall), "cpu": float(cpu), "rss": int(rss)}


def compare(a: Path, b: Path) -> str:
    """'bitwise equal' or what differs, tensor by tensor (names, dtypes, raw bytes)."""
    from safetensors import safe_open

    def tensors(folder):
        return {k: f for f in sorted(folder.glob("*.safetensors")) for k in safe_open(str(f), "pt").keys()}

    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        return f"different names ({len(set(ta) ^ set(tb))})"
    diff = total = 0
    for k in ta:
        x, y = safe_open(str(ta[k]), "pt").get_tensor(k), safe_open(str(tb[k]), "pt").get_tensor(k)
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
        if x.is_floating_point() and x.element_size() == 2:  # compare bits (NaN == NaN, -0 != +0)
            import torch

            x, y = x.view(torch.int16), y.view(torch.int16)
        diff += int((x != y).sum())
        total += x.numel()
    return "bitwise equal" if diff == 0 else f"{diff / total:.4%} of values differ"


def run_size(size: float, args, rows: list) -> None:
    cfg = llama_config(size)
    work = args.workdir / f"{size:g}gb"
    t0 = time.perf_counter()
    paths = generate(work / "models", cfg)
    nbytes = sum(f.stat().st_size for f in paths["a"].glob("*.safetensors"))
    print(f"# {size:g} GB: 3 x {nbytes / 1e9:.2f} GB, {cfg['num_hidden_layers']} layers, hidden "
          f"{cfg['hidden_size']} ({time.perf_counter() - t0:.0f} s to make)", flush=True)
    if args.generate_only:
        return
    from surgery.io.checkpoint import sha256_file

    for p in paths.values():  # warm page cache and surgery's input-hash cache (a first run on new inputs pays it)
        for f in p.glob("*.safetensors"):
            sha256_file(f)
    jobs = configs(paths, cfg["num_hidden_layers"])
    mergekit_yaml = str(Path(sys.executable).parent / "mergekit-yaml")
    results: dict = {}
    checks: dict = {}
    load = [os.getloadavg()[0]]
    for rep in range(args.repeats):
        for job in args.jobs:
            texts = jobs[job]
            for tool in ("surgery", "mergekit", "cp"):
                if tool == "cp" and not job.startswith("swap"):
                    continue
                out = work / f"out-{job}-{tool}"
                shutil.rmtree(out, ignore_errors=True)
                if tool == "cp":
                    cmd = ["cp", "-r", str(paths["a"]), str(out)]
                else:
                    conf = work / f"{job}-{tool}.yaml"
                    conf.write_text(texts.get(tool, texts.get("*")))
                    cmd = ([sys.executable, "-m", "surgery", "run", str(conf), "-o", str(out), "-q"]
                           if tool == "surgery" else [mergekit_yaml, str(conf), str(out)])
                os.sync()
                results.setdefault((job, tool), []).append(measure(cmd))
                load.append(os.getloadavg()[0])
                if rep == 0 and tool == "mergekit" and job != "swap_transition":  # mergekit's job differs there
                    checks[job] = compare(work / f"out-{job}-surgery", out)
                if rep > 0 or tool != "surgery":  # surgery's first output waits for the comparison
                    shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(work / f"out-{job}-surgery", ignore_errors=True)
            print(f"  repeat {rep + 1} {job}: " + ", ".join(
                f"{tool} {r[-1]['wall']:.2f}s/{r[-1]['cpu']:.2f}cpu" for (j, tool), r in results.items() if j == job),
                flush=True)
        size_rows = []
        for job in args.jobs:
            med = {tool: {k: statistics.median(r[k] for r in results[(job, tool)]) for k in ("wall", "cpu", "rss")}
                   for (j, tool) in results if j == job}
            size_rows.append((size, job, med, checks.get(job, "n/a (different jobs)")))
        print(f"  after {rep + 1} repeat(s), load average (1 min) {min(load):.1f}-{max(load):.1f}, "
              f"median {statistics.median(load):.1f} on {os.cpu_count()} CPUs", flush=True)
        print_table(size_rows)
    rows.extend(size_rows)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def print_table(rows: list) -> None:
    print("\n| size | job | surgery wall s | surgery CPU s | surgery RSS MB | mergekit wall s | mergekit CPU s | "
          "mergekit RSS MB | mk/surgery wall | mk/surgery CPU | mk/surgery RSS | cp -r wall s | cp -r CPU s | "
          "surgery/cp wall | surgery/cp CPU | output |")
    print("|---|---|" + "---:|" * 13 + "---|")
    for size, job, med, check in rows:
        s, m, c = med["surgery"], med["mergekit"], med.get("cp")
        cp = (f"{c['wall']:.2f} | {c['cpu']:.2f} | {s['wall'] / c['wall']:.2f}x | {s['cpu'] / c['cpu']:.2f}x"
              if c else " | | | ")
        print(f"| {size:g} GB | {job} | {s['wall']:.2f} | {s['cpu']:.2f} | {s['rss'] / 2**20:.0f} | {m['wall']:.2f} | "
              f"{m['cpu']:.2f} | {m['rss'] / 2**20:.0f} | {m['wall'] / s['wall']:.2f}x | {m['cpu'] / s['cpu']:.2f}x | "
              f"{m['rss'] / s['rss']:.2f}x | {cp} | {check} |")
    print(flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.5", help="comma-separated GB per checkpoint (0.5, 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/surgery-bench-perf"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the medians here")
    args = ap.parse_args()
    args.jobs = [j for j in args.jobs.split(",") if j]
    rows: list = []
    for size in [float(s) for s in args.sizes.split(",")]:
        run_size(size, args, rows)
    if not rows:
        return
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([{"size": r[0], "job": r[1], "medians": r[2], "output": r[3]} for r in rows],
                                        indent=2))


if __name__ == "__main__":
    main()
