"""Benchmark `surgery diff`: 2 experts vs a base of about 0.5 GB each (bf16 Llama-shaped checkpoints).

    PYTHONPATH=. python benchmarks/bench_analysis.py [--dir /tmp/surgery-bench-analysis] [--no-mergelens]

Each measurement runs in its own process; wall time and peak RSS (ru_maxrss of that process) are reported.
Baselines measured in the same run:
  - read floor, file: the three files read sequentially with readinto (page cache warm, as for every row)
  - read floor, tensors: every tensor of the three checkpoints read, in the analysis' order, with the
    reader `surgery diff` uses (plain file reads into fresh buffers); for comparison also through
    Checkpoint.get (safetensors mmap) + clone
  - mergelens compare (pip install mergelens) on the same files with --base
All runs happen with the files in the page cache (the first, untimed pass warms it), so the ratios measure
the computation, not the disk.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CFG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
           num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)


def make(folder: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    paths = {n: folder / n for n in ("base", "lang", "task")}
    if all((p / "model.safetensors").exists() for p in paths.values()):
        return paths
    cfg = LlamaConfig(**CFG)
    H, INTER, L, V = CFG["hidden_size"], CFG["intermediate_size"], CFG["num_hidden_layers"], CFG["vocab_size"]
    kv = H // CFG["num_attention_heads"] * CFG["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "self_attn.q_proj.weight": (H, H),
                       p + "self_attn.k_proj.weight": (kv, H), p + "self_attn.v_proj.weight": (kv, H),
                       p + "self_attn.o_proj.weight": (H, H), p + "post_attention_layernorm.weight": (H,),
                       p + "mlp.gate_proj.weight": (INTER, H), p + "mlp.up_proj.weight": (INTER, H),
                       p + "mlp.down_proj.weight": (H, INTER)})
    shapes.update({"model.norm.weight": (H,), "lm_head.weight": (V, H)})
    gen = torch.Generator().manual_seed(0)
    base = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
    profiles = {"lang": lambda i: 0.3 if i in (0, 1, L - 2, L - 1) else 0.02,
                "task": lambda i: 0.3 if L // 2 - 2 <= i < L // 2 + 2 else 0.02}
    for name, path in paths.items():
        path.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(path)
        if name == "base":
            state = base
        else:
            state = {}
            for n, t in base.items():
                layer = int(n.split(".")[2]) if ".layers." in n else -1
                scale = profiles[name](layer) if layer >= 0 else 0.05
                state[n] = (t.float() + scale * 0.02 * torch.randn(t.shape, generator=gen)).to(torch.bfloat16)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return paths


FLOOR_FILE = """
import sys, time
t = time.perf_counter(); buf = bytearray(64 << 20); n = 0
for p in sys.argv[1:]:
    with open(p, 'rb', buffering=0) as f:
        while (k := f.readinto(buf)): n += k
print(time.perf_counter() - t)
"""

FLOOR_TENSORS = """
import sys, time
t = time.perf_counter()
from surgery.analysis.stream import Reader
from surgery.io.checkpoint import Checkpoint
readers = [Reader(Checkpoint.open(p)) for p in sys.argv[1:]]
for name in readers[0].ck.keys():
    for r in readers:
        r.read(name, 0)
print(time.perf_counter() - t)
"""

FLOOR_MMAP = """
import sys, time
t = time.perf_counter()
from surgery.io.checkpoint import Checkpoint
cks = [Checkpoint.open(p) for p in sys.argv[1:]]
for name in cks[0].keys():
    for ck in cks:
        ck.get(name).clone()
print(time.perf_counter() - t)
"""


def measure(cmd: list[str], env=None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB of the child, stdout) for one process."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True); "
               "w = time.perf_counter() - t; "
               "sys.stderr.write(r.stderr[-2000:] if r.returncode else ''); "
               "print(w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, r.returncode); "
               "print(r.stdout[-300:])")
    out = subprocess.run([sys.executable, "-c", wrapper] + cmd, capture_output=True, text=True, env=env)
    first, _, rest = out.stdout.partition("\n")
    wall, rss, rc = first.split()
    if rc != "0":
        raise RuntimeError(f"{cmd[:3]} failed ({rc}): {out.stderr[-1000:]}")
    return float(wall), float(rss), rest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/surgery-bench-analysis")
    ap.add_argument("--no-mergelens", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best time is kept")
    args = ap.parse_args()
    paths = make(Path(args.dir))
    files = [str(p / "model.safetensors") for p in paths.values()]
    size = sum(os.path.getsize(f) for f in files)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    py = sys.executable
    runs = {
        "read floor: files (readinto)": [py, "-c", FLOOR_FILE] + files,
        "read floor: tensors (the reader surgery diff uses)":
            [py, "-c", FLOOR_TENSORS] + [str(p) for p in paths.values()],
        "read: tensors via Checkpoint.get (safetensors mmap) + clone":
            [py, "-c", FLOOR_MMAP] + [str(p) for p in paths.values()],
        "surgery diff (CLI, neurons+heads+pairs, --json)": [py, "-m", "surgery", "diff", str(paths["base"]),
                                                            str(paths["lang"]), str(paths["task"]), "--json", "-q"],
        "surgery diff (CLI, layer stats only)": [py, "-m", "surgery", "diff", str(paths["base"]), str(paths["lang"]),
                                                 str(paths["task"]), "--json", "-q", "--no-neurons", "--no-heads"],
    }
    subprocess.run([py, "-c", FLOOR_FILE] + files, capture_output=True)  # warm the page cache
    results = {}
    for r in range(args.repeat):  # round robin, so a busy spell on a shared machine hits every row alike
        for label, cmd in runs.items():
            m = measure(cmd, env)
            print(f"  round {r + 1}: {label}: {m[0]:.2f} s, peak RSS {m[1]:.0f} MB", file=sys.stderr)
            if label not in results or m[0] < results[label][0]:
                results[label] = m
    ml = None
    if not args.no_mergelens:
        exe = Path(py).with_name("mergelens")
        if exe.exists():
            out = Path(args.dir) / "mergelens.json"
            try:
                ml = measure([str(exe), "compare", str(paths["lang"]), str(paths["task"]), "--base", str(paths["base"]),
                              "--json", str(out), "--no-strategy"], env)
                results["mergelens compare --base (same files)"] = ml
                print(f"  mergelens: {ml[0]:.2f} s, peak RSS {ml[1]:.0f} MB", file=sys.stderr)
            except RuntimeError as e:
                print(f"  mergelens failed: {e}", file=sys.stderr)
        else:
            print("  mergelens is not installed (pip install mergelens)", file=sys.stderr)

    floor = results["read floor: tensors (the reader surgery diff uses)"][0]
    full = results["surgery diff (CLI, neurons+heads+pairs, --json)"][0]
    print(f"\n3 checkpoints, {size / 1e9:.2f} GB in all (bf16, {CFG['num_hidden_layers']} layers, hidden "
          f"{CFG['hidden_size']}), page cache warm, {os.cpu_count()} CPUs, best of {args.repeat}\n")
    print("| run | wall s | × tensor read floor | peak RSS MB |")
    print("|---|---:|---:|---:|")
    for label, (wall, rss, _) in results.items():
        print(f"| {label} | {wall:.2f} | {wall / floor:.2f} | {rss:.0f} |")
    if ml:
        print(f"\nsurgery diff is {ml[0] / full:.1f}× faster than mergelens compare "
              f"(peak RSS {results['surgery diff (CLI, neurons+heads+pairs, --json)'][1]:.0f} MB vs {ml[1]:.0f} MB)")


if __name__ == "__main__":
    main()
