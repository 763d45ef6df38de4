"""Benchmark of the engine (issue 2, part 10): peak RSS and wall time of `surgery run`.

    python benchmarks/bench_engine.py                       # 0.5 GB and 2 GB, 3 repeats
    python benchmarks/bench_engine.py --sizes 0.5 --repeats 1 --keep --workdir /tmp/sb

What it does, per model size:
  1. Generates a llama-shaped family (base, a, b): config.json + bf16 safetensors shards of at most
     2 GB, random tensors with the right names and shapes, written tensor by tensor (no model is
     instantiated, generation holds one tensor at a time).
  2. For each case (a layer swap with transition zones and blended embeddings, and arithmetic over
     three inputs) it measures, after a warm-up read of the inputs (so every run sees a hot page
     cache) and an `os.sync()`:
       - surgery:  `python -m surgery run RECIPE -o OUT --quiet --force` as a child process;
       - nohash:   the same with the input sha256 hashing turned off (monkeypatched), to show its cost;
       - floor:    a minimal loop in a child process that imports only torch + safetensors, reads every
                   input tensor the plan needs with safe_open().get_tensor, does the plan's fp32 math
                   where there is any (blend/arithmetic), and streams the same output bytes to shards.
     Peak RSS is the child's ru_maxrss (os.wait4), wall time is measured around the child. Each is
     repeated --repeats times; the table shows medians.
  3. Also measured: the peak RSS and start-up time of `python -c "import torch, safetensors,
     surgery.execute"` (the import baseline) and the largest tensor in the plan.
  4. Checks that the floor's output files are byte-identical to surgery's (same shard layout and
     header format), so both did the same work.

Targets (issue 2): peak RSS below 300 MB plus a few largest tensors and not growing with model size;
wall time <= 1.5x the floor.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20
SHARD_BYTES = 2 * 10**9

# ---------------------------------------------------------------------------- model shapes

PRESETS = {  # hidden, intermediate, heads, kv heads; layer count is fitted to the requested size
    "small": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=8),
    "large": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4),
}
VOCAB = 32000


def llama_config(size_gb: float) -> dict:
    p = dict(PRESETS["small" if size_gb < 1 else "large"])
    h, i = p["hidden_size"], p["intermediate_size"]
    kv = h // p["num_attention_heads"] * p["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    outside = 2 * VOCAB * h + h
    layers = max(2, round((size_gb * 1e9 / 2 - outside) / per_layer))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
        "num_hidden_layers": layers, **p, "hidden_act": "silu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "mlp_bias": False,
    }


def llama_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of LlamaForCausalLM, in state_dict order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def generate(folder: Path, cfg: dict, seed: int) -> Path:
    """Write one random bf16 checkpoint, one tensor in memory at a time."""
    import torch

    from surgery.io.safetensors import TensorMeta
    from surgery.io.writer import ShardedWriter

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    specs = [(n, TensorMeta("BF16", s)) for n, s in llama_tensors(cfg)]
    gen = torch.Generator().manual_seed(seed)
    with ShardedWriter(folder, specs, SHARD_BYTES) as w:
        for name, meta in specs:
            if len(meta.shape) == 1:
                t = 1 + 0.1 * torch.randn(meta.shape, generator=gen)
            else:
                t = 0.02 * torch.randn(meta.shape, generator=gen)
            w.write(name, t.to(torch.bfloat16))
            del t
    return folder


# ---------------------------------------------------------------------------- cases

def recipes(family: dict[str, Path], n_layers: int) -> dict[str, str]:
    def common(*names):  # surgery hashes every listed input, so list only the ones used
        inputs = "\n".join(f"  {k}: {family[k]}" for k in names)
        return f"inputs:\n{inputs}\noutput:\n  shard_size: {SHARD_BYTES}\n"

    k, t = max(1, n_layers // 6), 1 if n_layers < 12 else 2
    return {
        # bottom/top n/6 layers from the donor, ramps next to them, embeddings blended 50/50
        "swap": common("a", "b") + f"recipient: a\noperations:\n  - layer_swap:\n      donor: b\n      bottom: {k}\n"
                         f"      top: {k}\n      transition: {t}\n      embeddings: 0.5\n",
        # three inputs really read: base keeps weight 0.2
        "arith3": common("base", "a", "b") + "recipient: base\noperations:\n"
                           "  - arithmetic:\n      expr: base + 0.5*(a - base) + 0.3*(b - base)\n",
        # the expression: base cancels (1 - 0.7 - 0.3 = 0) if the parser drops the float residue
        # (5.6e-17); "read GB" in the table shows whether the plan still reads it
        "arith": common("base", "a", "b") + "recipient: base\noperations:\n"
                          "  - arithmetic:\n      expr: base + 0.7*(a - base) + 0.3*(b - base)\n",
    }


def floor_spec(recipe_path: Path) -> dict:
    """What the floor must do, from surgery's plan: per output tensor, input files, names, coefficients."""
    from surgery.core.graph import Node, Ref
    from surgery.pipeline import build_plan
    from surgery.loader import load_recipe

    plan = build_plan(load_recipe(recipe_path))
    shards, current, size = [], [], 0
    needed: set[str] = set()
    for e in plan.entries:
        node = e.node
        if isinstance(node, Ref):
            terms, coeffs = [node], None
        elif isinstance(node, Node) and node.op == "linear" and all(isinstance(a, Ref) for a in node.args):
            terms, coeffs = node.args, node.params["coeffs"]
        else:
            raise SystemExit(f"floor does not know op tree {node!r}")
        src = [(str(plan.inputs[r.input].weight_map[r.name]), r.name) for r in terms]
        needed.update(f for f, _ in src)
        item = {"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "src": src, "coeffs": coeffs}
        if current and size + e.nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += e.nbytes
    shards.append(current)
    read_bytes = sum(plan.inputs[r.input].meta[r.name].nbytes
                     for e in plan.entries for r in _refs(e.node))
    largest = max(e.nbytes for e in plan.entries)
    for ck in plan.inputs.values():
        ck.close()
    return {"shards": shards, "files": sorted(needed), "read_bytes": read_bytes, "write_bytes": plan.total_bytes,
            "largest": largest, "tensors": len(plan.entries)}


def _refs(node):
    from surgery.core.graph import refs

    return refs(node)


# ---------------------------------------------------------------------------- the floor (child process)

FLOOR = r'''
import json, sys, torch
from safetensors import safe_open
spec, out = json.load(open(sys.argv[1])), sys.argv[2]
DT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
SIZE = {"BF16": 2, "F16": 2, "F32": 4}
handles = {}
def get(f, n):
    if f not in handles:
        handles[f] = safe_open(f, framework="pt")
    return handles[f].get_tensor(n)
n = len(spec["shards"])
for i, shard in enumerate(spec["shards"]):
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for t in shard:
        nb = SIZE[t["dtype"]]
        for d in t["shape"]:
            nb *= d
        header[t["name"]] = {"dtype": t["dtype"], "shape": t["shape"], "data_offsets": [off, off + nb]}
        off += nb
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    with open(f"{out}/{name}", "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for t in shard:
            if t["coeffs"] is None:
                x = get(*t["src"][0])
            else:
                x = None
                for c, (f, nm) in zip(t["coeffs"], t["src"]):
                    y = get(f, nm).float()
                    x = y.mul_(c) if x is None else x.add_(y, alpha=c)
                x = x.to(DT[t["dtype"]])
            fh.write(memoryview(x.contiguous().view(-1).view(torch.uint8).numpy()))
'''

NOHASH = ("import sys, surgery.execute as ex; ex.sha256_file = lambda path: 'not-hashed'; "
          "from surgery.cli import main; sys.argv = ['surgery'] + sys.argv[1:]; main()")


# ---------------------------------------------------------------------------- measuring

def measure(cmd: list[str], env: dict) -> tuple[float, int, float]:
    """Run a child; return (wall seconds, peak RSS bytes, CPU seconds) from its own rusage."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace")
    p.stdout.close(), p.stderr.close()
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{err}")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss is KiB on Linux


def warm(files: list[str]) -> None:
    """Read the inputs once so every measured run sees a hot page cache."""
    buf = bytearray(16 * MB)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def clean(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    os.sync()


def sha_dir(path: Path) -> dict[str, str]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while b := fh.read(16 * MB):
                h.update(b)
        out[f.name] = h.hexdigest()
    return out


def fmt_mb(b: float) -> str:
    return f"{b / MB:,.0f}"


# ---------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.5,2", help="model sizes in GB, comma-separated (default 0.5,2)")
    ap.add_argument("--cases", default="swap,arith3,arith", help="swap, arith3, arith (default all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where checkpoints go (default: a temp dir under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--no-nohash", action="store_true", help="skip the runs with input hashing off")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args()

    py = sys.executable
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    sys.path.insert(0, str(ROOT))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="surgery-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    floor_py = work / "floor.py"
    floor_py.write_text(FLOOR)
    results = {"machine": machine(), "cases": []}
    try:
        imp = [measure([py, "-c", "import torch, safetensors, surgery.execute"], env) for _ in range(args.repeats)]
        base_wall = statistics.median(m[0] for m in imp)
        base_rss = statistics.median(m[1] for m in imp)
        results["import_baseline"] = {"wall": base_wall, "rss": base_rss}
        print(f"import baseline (python -c 'import torch, safetensors, surgery.execute'): "
              f"peak RSS {fmt_mb(base_rss)} MB, {base_wall:.2f} s", flush=True)
        for size in [float(s) for s in args.sizes.split(",")]:
            cfg = llama_config(size)
            fam_dir = work / f"{size:g}GB"
            family = {}
            t0 = time.perf_counter()
            for seed, name in enumerate(["base", "a", "b"]):
                d = fam_dir / name
                if not (d / "config.json").exists() or json.loads((d / "config.json").read_text()) != cfg:
                    shutil.rmtree(d, ignore_errors=True)
                    generate(d, cfg, seed)
                family[name] = d
            total = sum(f.stat().st_size for f in (fam_dir / "base").glob("*.safetensors"))
            print(f"\n== {size:g} GB: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
                  f"{total / 1e9:.2f} GB per checkpoint (ready in {time.perf_counter() - t0:.0f} s)", flush=True)
            for case, text in recipes(family, cfg["num_hidden_layers"]).items():
                if case not in args.cases.split(","):
                    continue
                rpath = fam_dir / f"{case}.yaml"
                rpath.write_text(text)
                spec = floor_spec(rpath)
                spath = fam_dir / f"{case}.floor.json"
                spath.write_text(json.dumps(spec))
                out_s, out_f = fam_dir / f"out-{case}", fam_dir / f"out-{case}-floor"
                variants = {
                    "floor": [py, str(floor_py), str(spath), str(out_f)],
                    "surgery": [py, "-m", "surgery", "run", str(rpath), "-o", str(out_s), "--quiet", "--force"],
                    "nohash": [py, "-c", NOHASH, "run", str(rpath), "-o", str(out_s), "--quiet", "--force"],
                }
                if args.no_nohash:
                    variants.pop("nohash")
                runs = {k: [] for k in variants}
                for rep in range(args.repeats):
                    for k, cmd in variants.items():
                        out = out_f if k == "floor" else out_s
                        clean(out)
                        if k == "floor":
                            out.mkdir()
                        warm(spec["files"])
                        runs[k].append(measure(cmd, env))
                        if rep == args.repeats - 1 and k in ("floor", "surgery"):
                            runs[k + "_sha"] = sha_dir(out)
                same = runs.pop("floor_sha") == runs.pop("surgery_sha")
                row = {"size_gb": size, "checkpoint_bytes": total, "case": case, "layers": cfg["num_hidden_layers"],
                       "read_bytes": spec["read_bytes"], "write_bytes": spec["write_bytes"],
                       "largest": spec["largest"], "same_bytes": same}
                for k, rs in runs.items():
                    row[k] = {"wall": statistics.median(m[0] for m in rs), "rss": statistics.median(m[1] for m in rs),
                              "cpu": statistics.median(m[2] for m in rs),
                              "walls": [m[0] for m in rs], "rsss": [m[1] for m in rs], "cpus": [m[2] for m in rs]}
                results["cases"].append(row)
                print_row(row, base_rss)
                clean(out_s), clean(out_f)
        print()
        print(table(results))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.keep:
            for d in work.glob("*GB"):
                shutil.rmtree(d, ignore_errors=True)
            floor_py.unlink(missing_ok=True)


def print_row(row: dict, base_rss: float) -> None:
    s, f = row["surgery"], row["floor"]
    extra = f", nohash {row['nohash']['wall']:.2f} s" if "nohash" in row else ""
    print(f"  {row['case']:7s} read {row['read_bytes'] / 1e9:.2f} GB, write {row['write_bytes'] / 1e9:.2f} GB: "
          f"surgery {s['wall']:.2f} s (runs {', '.join(f'{w:.2f}' for w in s['walls'])}){extra}, "
          f"floor {f['wall']:.2f} s (runs {', '.join(f'{w:.2f}' for w in f['walls'])}) "
          f"-> {s['wall'] / f['wall']:.2f}x; "
          f"CPU s: surgery {s['cpu']:.2f}, floor {f['cpu']:.2f} -> {s['cpu'] / f['cpu']:.2f}x; "
          f"peak RSS {fmt_mb(s['rss'])} MB ({fmt_mb(s['rss'] - base_rss)} over imports), "
          f"floor peak RSS {fmt_mb(f['rss'])} MB, largest tensor {fmt_mb(row['largest'])} MB; "
          f"output == floor output: {row['same_bytes']}", flush=True)


def table(results: dict) -> str:
    base = results["import_baseline"]["rss"]
    head = ("| size | case | read GB | write GB | largest tensor MB | peak RSS MB | RSS over imports MB "
            "| surgery s | no-hash s | floor s | surgery/floor | no-hash/floor | CPU surgery/floor | bytes = floor |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results["cases"]:
        s, f, n = r["surgery"], r["floor"], r.get("nohash")
        nw, nr = (f"{n['wall']:.2f}", f"{n['wall'] / f['wall']:.2f}x") if n else ("-", "-")
        lines.append(
            f"| {r['size_gb']:g} GB | {r['case']} | {r['read_bytes'] / 1e9:.2f} | {r['write_bytes'] / 1e9:.2f} "
            f"| {fmt_mb(r['largest'])} | {fmt_mb(s['rss'])} | {fmt_mb(s['rss'] - base)} | {s['wall']:.2f} | {nw} "
            f"| {f['wall']:.2f} | {s['wall'] / f['wall']:.2f}x | {nr} | {s['cpu'] / f['cpu']:.2f}x "
            f"| {'yes' if r['same_bytes'] else 'NO'} |")
    imp = results["import_baseline"]
    lines.append(f"\nimport baseline: {fmt_mb(imp['rss'])} MB peak RSS, {imp['wall']:.2f} s; machine: "
                 f"{results['machine']}")
    return "\n".join(lines)


def machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__}"


if __name__ == "__main__":
    main()
