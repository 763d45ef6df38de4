"""Benchmark `surgery probe` against a plain transformers forward loop on the same texts.

    PYTHONPATH=. python benchmarks/bench_probe.py [--texts 48] [--max-tokens 32] [--repeats 3] [--model DIR]

Model: the real SmolLM2-135M-Instruct (surgery.io.gguf.smollm2_checkpoint), in float32 on the CPU.
Texts: `surgery data mo` output from this machine's gettext catalogs: N texts each of en, de, fr, es for
LAPE and probing, plus N en-de pairs for alignment (both sides run forward): 6N texts in all.

Every measurement runs in its own process, after the model is loaded (loading is not timed):
  - probe:  surgery.probe(model object, ...) with all three analyses (LAPE, probes, alignment)
  - causal: for each batch, AutoModelForCausalLM(**batch, output_hidden_states=True)   (what users write)
  - base:   the same with the backbone only (AutoModel: no LM head, no logits)
The baselines get the texts pre-sorted by token count, so they pad exactly as much as `surgery probe`
(which sorts). Rows interleave the three kinds, `--repeats` times; the table shows medians of wall and CPU
time (the process's user+sys) and tokens per second. Peak RSS (ru_maxrss) is reported for probe at N
and 4N texts: memory must not grow with the number of texts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_texts(folder: Path, n: int) -> dict:
    from surgery.probing.mo_data import write_mo_data

    write_mo_data(["de", "fr", "es"], folder, limit=4 * n)  # spread over the catalogs: every 4th pair
    texts = {}
    for lang in ("en", "de", "fr", "es"):
        lines = (folder / f"{lang}.txt").read_text(encoding="utf-8").splitlines()
        texts[lang] = lines[::max(1, len(lines) // n)][:n]
    pairs = [json.loads(x) for x in (folder / "en-de.jsonl").read_text(encoding="utf-8").splitlines()]
    pairs = pairs[1::max(1, len(pairs) // n)][:n]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return {"texts": texts, "pairs": [(p["en"], p["de"]) for p in pairs], "parallel": str(folder / "pairs.jsonl")}


def worker(kind: str, model_dir: str, data_file: str, batch_size: int, max_tokens: int) -> dict:
    import torch
    import transformers as tf

    tf.utils.logging.disable_progress_bar()
    data = json.loads(Path(data_file).read_text())
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    cls = tf.AutoModel if kind == "base" else tf.AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [t for ts in data["texts"].values() for t in ts] + [t for p in data["pairs"] for t in p]
    ids = tok(texts, truncation=True, max_length=max_tokens)["input_ids"]
    texts = [texts[i] for i in sorted(range(len(texts)), key=lambda i: -len(ids[i]))]
    n_tokens = sum(map(len, ids))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cpu0, wall0 = os.times(), time.perf_counter()
    if kind == "probe":
        import surgery

        files = {}
        for lang, ts in data["texts"].items():
            files[lang] = Path(data_file).with_name(f"bench-{lang}.txt")
            files[lang].write_text("".join(t + "\n" for t in ts), encoding="utf-8")
        r = surgery.probe({"m": model}, {k: str(v) for k, v in files.items()}, parallel=[data["parallel"]],
                          tokenizer=tok, batch_size=batch_size, max_tokens=max_tokens, progress=False)
        m = r.models["m"]
        assert m.tokens == n_tokens and m.lape and m.probing and m.alignment
    else:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_tokens,
                          return_tensors="pt")
                out = model(**enc, output_hidden_states=True)
                assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    wall, cpu1 = time.perf_counter() - wall0, os.times()
    return {"kind": kind, "tokens": n_tokens, "texts": len(texts), "wall": wall,
            "cpu": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_worker(kind, model_dir, data_file, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--model", model_dir, "--data", data_file,
                          "--batch-size", str(args.batch_size), "--max-tokens", str(args.max_tokens)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        sys.exit(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=48, help="texts per language (N); 6N texts run in all")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", help="checkpoint dir (default: the converted SmolLM2-135M)")
    ap.add_argument("--worker"), ap.add_argument("--data")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.data, args.batch_size, args.max_tokens)))
        return
    if args.model is None:
        from surgery.io.gguf import smollm2_checkpoint

        args.model = str(smollm2_checkpoint())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {}
        for n in (args.texts, 4 * args.texts):
            d = tmp / f"n{n}"
            data = make_texts(d, n)
            files[n] = str(d / "data.json")
            Path(files[n]).write_text(json.dumps(data, ensure_ascii=False))
        rows = {k: [] for k in ("probe", "causal", "base")}
        for _ in range(args.repeats):
            for kind in rows:
                rows[kind].append(run_worker(kind, args.model, files[args.texts], args))
        big = run_worker("probe", args.model, files[4 * args.texts], args)
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("wall", "cpu", "peak_rss_mb")} for k, v in rows.items()}
    tokens = rows["probe"][0]["tokens"]
    print(f"SmolLM2-135M fp32, CPU ({os.cpu_count()} cores), {rows['probe'][0]['texts']} texts, {tokens} tokens, "
          f"batch {args.batch_size}, max {args.max_tokens} tokens; median of {args.repeats} interleaved runs\n")
    print(f"{'run':<44}{'wall s':>8}{'CPU s':>8}{'tok/s wall':>12}{'tok/CPU-s':>11}{'peak RSS MB':>13}")
    names = {"probe": "surgery probe (LAPE + probes + alignment)", "causal": "causal LM, output_hidden_states",
             "base": "backbone only, output_hidden_states"}
    for k, m in med.items():
        print(f"{names[k]:<44}{m['wall']:>8.2f}{m['cpu']:>8.2f}{tokens / m['wall']:>12.0f}{tokens / m['cpu']:>11.0f}"
              f"{m['peak_rss_mb']:>13.0f}")
    print()
    for k in ("causal", "base"):
        print(f"probe / {k:<7} tokens/s: wall {med[k]['wall'] / med['probe']['wall']:.2f}x, "
              f"CPU {med[k]['cpu'] / med['probe']['cpu']:.2f}x")
    print(f"peak RSS of probe: {med['probe']['peak_rss_mb']:.0f} MB at {rows['probe'][0]['texts']} texts, "
          f"{big['peak_rss_mb']:.0f} MB at {big['texts']} texts ({big['tokens']} tokens; "
          f"{big['tokens'] / big['wall']:.0f} tok/s wall, {big['tokens'] / big['cpu']:.0f} tok/CPU-s)")


if __name__ == "__main__":
    main()
