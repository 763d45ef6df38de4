"""surgery run vs mergekit-yaml on the same mergekit configs, ~0.5 GB bf16 checkpoints.

    python benchmarks/bench_mergekit.py [--dir /tmp/bench_mergekit] [--only ties] [--repeat 1]

Makes three llama-shaped checkpoints (base + two fine-tunes, ~490 MB each in bfloat16) once
(for union_vocab also tokenizers and a fourth with two added tokens),
then runs each config with both tools as separate processes and prints wall time and peak
RSS (of the process tree's largest process) with the ratios mergekit / surgery. Both read the
same files, which the first run leaves in the page cache. Outputs are compared for equality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=14, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000)

CONFIGS = {
    "linear": """
models:
  - {{model: {base}, parameters: {{weight: 0.4}}}}
  - {{model: {a}, parameters: {{weight: 0.3}}}}
  - {{model: {b}, parameters: {{weight: 0.3}}}}
merge_method: linear
""",
    "task_arithmetic": """
models:
  - {{model: {a}, parameters: {{weight: 0.6}}}}
  - {{model: {b}, parameters: {{weight: 0.4}}}}
merge_method: task_arithmetic
base_model: {base}
""",
    "ties": """
models:
  - {{model: {a}, parameters: {{weight: 0.5, density: 0.5}}}}
  - {{model: {b}, parameters: {{weight: 0.5, density: 0.5}}}}
merge_method: ties
base_model: {base}
""",
    # a chat fine-tune with two added tokens: embeddings and lm_head re-indexed to the union vocabulary
    "union_vocab": """
models:
  - {{model: {chat}, parameters: {{weight: 0.6}}}}
  - {{model: {b}, parameters: {{weight: 0.4}}}}
merge_method: task_arithmetic
base_model: {base}
tokenizer_source: union
""",
}

MEASURE = """
import resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
if r.returncode:
    sys.stderr.write(r.stderr[-3000:])
    sys.exit(r.returncode)
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(wall, u.ru_maxrss * 1024, u.ru_utime + u.ru_stime)
"""


def make_checkpoints(folder: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    paths = {n: folder / n for n in ("base", "a", "b")}
    if all((p / "model.safetensors").exists() for p in paths.values()):
        return paths
    cfg = LlamaConfig(**SHAPE, max_position_embeddings=2048, tie_word_embeddings=False,
                      architectures=["LlamaForCausalLM"])
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       **{p + f"self_attn.{k}_proj.weight": (h, h) for k in "qkvo"},
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    gen = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=gen) * 0.02).bfloat16() for k, s in shapes.items()}
    for name, path in paths.items():
        path.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(path)
        state = base if name == "base" else {
            k: (t.float() + torch.randn(t.shape, generator=gen) * 0.002).bfloat16() for k, t in base.items()}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return paths


def add_chat_model(paths: dict[str, Path]) -> None:
    """Tokenizers (WordLevel, vocab_size tokens) for every checkpoint, and 'chat': 'a' with two added tokens."""
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    chat = paths["a"].parent / "chat"
    paths["chat"] = chat
    if (chat / "model.safetensors").exists():
        return

    def tokenizer(added=()):
        vocab = {"[UNK]": 0, **{f"w{j}": j for j in range(1, SHAPE["vocab_size"])}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
        if added:
            fast.add_special_tokens({"additional_special_tokens": list(added)})
        return fast

    for name in ("base", "a", "b"):
        tokenizer().save_pretrained(paths[name])
    state = load_file(str(paths["a"] / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        state[k] = torch.cat([state[k], (torch.randn(2, state[k].shape[1], generator=gen) * 0.02).bfloat16()])
    chat.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**{**SHAPE, "vocab_size": SHAPE["vocab_size"] + 2}, max_position_embeddings=2048,
                tie_word_embeddings=False, architectures=["LlamaForCausalLM"]).save_pretrained(chat)
    save_file(state, str(chat / "model.safetensors"), metadata={"format": "pt"})
    tokenizer(["<|im_start|>", "<|im_end|>"]).save_pretrained(chat)


def measure(cmd: list[str]) -> tuple[float, int, float]:
    """(wall seconds, peak RSS bytes, CPU seconds) of a command."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", MEASURE, *cmd], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    wall, rss, cpu = r.stdout.split()
    return float(wall), int(rss), float(cpu)


def same_output(a: Path, b: Path) -> str:
    from safetensors import safe_open

    fa = sorted(a.glob("*.safetensors"))
    fb = sorted(b.glob("*.safetensors"))
    ta = {k: f for f in fa for k in safe_open(str(f), "pt").keys()}
    tb = {k: f for f in fb for k in safe_open(str(f), "pt").keys()}
    if sorted(ta) != sorted(tb):
        return "different tensor names"
    diff = total = 0
    for k in ta:
        x, y = safe_open(str(ta[k]), "pt").get_tensor(k), safe_open(str(tb[k]), "pt").get_tensor(k)
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{k}: dtype/shape differ"
        diff += int((x != y).sum())
        total += x.numel()
    return "bitwise equal" if diff == 0 else f"{diff / total:.3%} of values differ"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/bench_mergekit", type=Path)
    ap.add_argument("--only", nargs="*", default=list(CONFIGS))
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool; the best is reported")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    paths = make_checkpoints(args.dir / "models")
    if "union_vocab" in args.only:
        add_chat_model(paths)
    size = (paths["base"] / "model.safetensors").stat().st_size
    print(f"checkpoints: 3 x {size / 1e6:.0f} MB bf16 in {args.dir / 'models'} ({time.perf_counter() - t:.0f}s)")
    mergekit_yaml = Path(sys.executable).parent / "mergekit-yaml"
    rows = []
    for name in args.only:
        config = args.dir / f"{name}.yml"
        config.write_text(CONFIGS[name].format(**{k: str(v) for k, v in paths.items()}))
        best = {}
        tools = ["mergekit", "surgery"] + (["surgery --fast-kernels"] if name == "ties" else [])
        for _ in range(args.repeat):  # interleaved: each repeat runs every tool once
            for tool in tools:
                out = args.dir / f"out_{name}_{tool.replace(' --', '_')}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = ([str(mergekit_yaml), str(config), str(out), "--quiet"] if tool == "mergekit" else
                       [sys.executable, "-m", "surgery", "run", str(config), "-o", str(out), "-q", *tool.split()[1:]])
                wall, rss, cpu = measure(cmd)
                if tool not in best or wall < best[tool][0]:
                    best[tool] = (wall, rss, cpu)
        mk_t, mk_m, mk_c = best["mergekit"]
        for tool in tools[1:]:
            check = same_output(args.dir / f"out_{name}_mergekit", args.dir / f"out_{name}_{tool.replace(' --', '_')}")
            s_t, s_m, s_c = best[tool]
            label = name + (" (--fast-kernels)" if "fast" in tool else "")
            rows.append((label, mk_t, s_t, mk_t / s_t, mk_c, s_c, mk_c / s_c, mk_m / 1e9, s_m / 1e9, mk_m / s_m,
                         check))
            print(f"  {label}: mergekit {mk_t:.1f}s, surgery {s_t:.1f}s ({check})", flush=True)
    print()
    print("| config | mergekit wall s | surgery wall s | speed-up | mergekit CPU s | surgery CPU s | CPU ratio "
          "| mergekit peak RSS GB | surgery peak RSS GB | RSS ratio | output |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.2f}x | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.2f}x "
              f"| {r[7]:.2f} | {r[8]:.2f} | {r[9]:.2f}x | {r[10]} |")
    print(json.dumps({"nproc": os.cpu_count()}))


if __name__ == "__main__":
    main()
