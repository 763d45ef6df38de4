"""Adapter costs against baselines measured in the same run.

    PYTHONPATH=. python benchmarks/adapters_bench.py [--hidden 1024] [--layers 8] [--rank 16]

1. `surgery run` with a LoRA input as recipient (merge while streaming) vs the plain base as
   recipient (a byte copy), and vs PEFT's load + merge_and_unload + save_pretrained.
2. `extract-lora` at a rank vs the same loop reading both checkpoints without SVD.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


def make(root: Path, hidden: int, layers: int, rank: int):
    from helpers import random_state, save_checkpoint, tiny_config

    cfg = tiny_config("llama", hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=8192)
    state = random_state(cfg, 0)
    base = save_checkpoint(root / "base", state, cfg, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    lora, tuned = {}, {}
    for k, v in state.items():
        tuned[k] = v.clone()
        if v.dim() == 2 and (".self_attn." in k or ".mlp." in k):
            mod = k[: -len(".weight")]
            a = torch.randn(rank, v.shape[1], generator=gen) * 0.02
            b = torch.randn(v.shape[0], rank, generator=gen) * 0.02
            lora[f"base_model.model.{mod}.lora_A.weight"] = a
            lora[f"base_model.model.{mod}.lora_B.weight"] = b
            tuned[k] = v + 2.0 * (b @ a) + 1e-3 * torch.randn(v.shape, generator=gen)
    (root / "lora").mkdir()
    save_file(lora, str(root / "lora" / "adapter_model.safetensors"))
    (root / "lora" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "k_proj", "v_proj",
        "o_proj", "gate_proj", "up_proj", "down_proj"], "fan_in_fan_out": False}))
    save_checkpoint(root / "tuned", tuned, cfg, dtype=torch.bfloat16)
    return base


def timed(fn, repeat=2):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from surgery.pipeline import run
    from surgery.pipeline import extract_lora

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make(root, args.hidden, args.layers, args.rank)
        copy = {"inputs": {"base": str(root / "base")}}
        merge = {"inputs": {"base": str(root / "base"), "sw": {"adapter": str(root / "lora"), "base": "base"}},
                 "recipient": "sw"}
        t_copy = timed(lambda: run(copy, root / "o1", force=True))
        t_merge = timed(lambda: run(merge, root / "o2", force=True))

        def peft_merge():
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            m = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16)
            PeftModel.from_pretrained(m, root / "lora").merge_and_unload().save_pretrained(root / "o3")

        t_peft = timed(peft_merge)

        def read_only():
            from surgery.io.checkpoint import Checkpoint

            b, t = Checkpoint.open(root / "base"), Checkpoint.open(root / "tuned")
            for k in b.keys():
                (t.get(k).float() - b.get(k).float()).norm()

        t_read = timed(read_only)
        res = {}

        def extract(method):
            res[method] = extract_lora(root / "base", root / "tuned", root / "x", rank=args.rank, svd=method,
                                       force=True)

        t_extract = timed(lambda: extract("full"), repeat=1)
        t_low = timed(lambda: extract("lowrank"), repeat=1)
        err = {m: max(r.rel_error for r in res[m].rows) for m in res}
        size = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors")) / 1e6
    print(f"model: hidden {args.hidden}, {args.layers} layers, {size:.0f} MB bf16; LoRA rank {args.rank}; 1 thread")
    print(f"{'task':<44}{'seconds':>9}{'ratio':>8}")
    print(f"{'surgery run, base as recipient (copy)':<44}{t_copy:>9.2f}{1.0:>8.2f}")
    print(f"{'surgery run, LoRA input as recipient':<44}{t_merge:>9.2f}{t_merge / t_copy:>8.2f}")
    print(f"{'peft load + merge_and_unload + save':<44}{t_peft:>9.2f}{t_peft / t_copy:>8.2f}")
    print(f"{'read base+tuned, delta norms (no SVD)':<44}{t_read:>9.2f}{1.0:>8.2f}")
    print(f"{'extract-lora --rank (full SVD per tensor)':<44}{t_extract:>9.2f}{t_extract / t_read:>8.2f}")
    print(f"{'extract-lora --rank --svd lowrank':<44}{t_low:>9.2f}{t_low / t_read:>8.2f}")
    print(f"max relative error: full {err['full']:.4f}, lowrank {err['lowrank']:.4f}")


if __name__ == "__main__":
    main()
