"""The stages of the case study. Every analysis, merge and evaluation is `surgery`'s (Python API or CLI)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import yaml

import recipes
from problems import eval_rows, make_problems, training_text
from texts import split_texts

LANG = "de"           # the target language
EXPERTS = ("math", "german", "english")


def _write_lines(path: Path, lines) -> Path:
    path.write_text("".join(line.replace("\n", " ") + "\n" for line in lines), encoding="utf-8")
    return path


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


class Experiment:
    def __init__(self, settings, out: Path, seed: int, device: str, log, pace=lambda: None):
        self.s, self.out, self.seed, self.device, self.log = settings, out, seed, device, log
        self.pace = pace  # called before each long step (the thread count may change with the machine's load)
        for sub in ("data", "sets", "models", "recipes", "diff", "probe", "search"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        self.sets = out / "sets"
        self.models: dict[str, Path] = {}

    # ---- data -----------------------------------------------------------------------------------
    def prepare_data(self) -> dict:
        s = self.s
        langs = [LANG, *s.other_langs]
        cmd = [sys.executable, "-m", "surgery", "data", "mo", "--langs", ",".join(langs),
               "-o", str(self.out / "data"), "--json"]
        self.log("$ surgery data mo --langs " + ",".join(langs) + " -o OUT/data")
        counts = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        parts = split_texts(self.out / "data", LANG, list(s.other_langs), n_eval=s.text_eval,
                            n_probe=s.probe_texts, seed=self.seed)
        for lang, lines in parts["eval"].items():
            _write_lines(self.sets / f"text_{lang}.txt", lines)
        for lang, lines in parts["probe"].items():
            _write_lines(self.sets / f"probe_{lang}.txt", lines)
        _write_jsonl(self.sets / f"parallel_en-{LANG}.jsonl", [{"en": e, LANG: t} for e, t in parts["parallel"]])
        self.lang_train = {"german": parts["train"], "english": parts["train_en"]}
        train, held = make_problems(s.math_train, s.math_test + s.math_dev, self.seed)
        test, dev = held[:s.math_test], held[s.math_test:]
        self.math_train = train
        for lang in ("en", LANG):
            _write_jsonl(self.sets / f"math_{lang}.jsonl", eval_rows(test, lang))
        _write_jsonl(self.sets / f"math_{LANG}_dev.jsonl", eval_rows(dev, LANG))
        _write_jsonl(self.sets / "math_train_en.jsonl",
                     [{"prompt": p.prompt("en"), "completion": p.completion()} for p in train])
        examples = {f"math {lang}": eval_rows(test[:2], lang) for lang in ("en", LANG)}
        return {"mo_counts": counts, "lang_train_strings": len(parts["train"]), "math_train": len(train),
                "math_test": len(test), "math_dev": len(dev), "text_eval": s.text_eval, "probe_texts": s.probe_texts,
                "examples": examples, "templates": len({p.template for p in train})}

    # ---- models ---------------------------------------------------------------------------------
    def base_model(self) -> Path:
        from surgery.io.gguf import smollm2_checkpoint

        self.models["base"] = smollm2_checkpoint(dtype="float32")
        self.log(f"base: {self.models['base']}")
        return self.models["base"]

    def finetune(self, name: str) -> dict:
        """Train one expert (or reuse it when a finished one with the same settings is in OUT/models)."""
        from finetune import finetune, lm_examples, sft_examples
        from transformers import AutoTokenizer

        s, base = self.s, self.models["base"]
        if name == "math":
            spec = {"steps": s.math_steps, "batch_size": s.math_batch}
        else:
            spec = {"steps": s.lang_steps, "batch_size": s.lang_batch, "seq_len": s.seq_len}
        spec.update(lr=s.lr, seed=self.seed + EXPERTS.index(name), base=str(base), data=self._data_hash(name))
        folder = self.out / "models" / name
        self.models[name] = folder
        meta = folder / "finetune.json"
        if meta.is_file() and json.loads(meta.read_text()).get("spec") == spec:
            self.log(f"{name}: reusing {folder}")
            return json.loads(meta.read_text())["result"]
        tok = AutoTokenizer.from_pretrained(base)
        if name == "math":
            examples = sft_examples(tok, [training_text(p) for p in self.math_train])
        else:
            examples = lm_examples(tok, self.lang_train[name], s.seq_len)
        result = finetune(base, folder, examples, steps=spec["steps"], batch_size=spec["batch_size"], lr=s.lr,
                          seed=spec["seed"], device=self.device, log=self.log, pace=self.pace)
        meta.write_text(json.dumps({"spec": spec, "result": result}, indent=1) + "\n")
        return result

    def _data_hash(self, name: str) -> str:
        if name == "math":
            text = "\n".join(p.prompt("en") + p.completion() for p in self.math_train)
        else:
            text = "\n".join(self.lang_train[name])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # ---- analysis -------------------------------------------------------------------------------
    def diff(self) -> dict:
        import surgery

        experts = {n: str(self.models[n]) for n in EXPERTS}
        r = surgery.diff(str(self.models["base"]), experts)
        (self.out / "diff" / "diff.json").write_text(r.to_json(k=0.01))
        r.plot_heatmap(self.out / "diff" / "diff.png")
        r.plot_layers(self.out / "diff" / "diff_layers.png")
        layers = {n: [r.experts[n].layers[i].relative for i in range(r.num_layers)] for n in EXPERTS}
        return {"num_layers": r.num_layers, "relative": layers,
                "ranking": {n: [layer for layer, _ in r.layer_ranking(n)] for n in EXPERTS},
                "cosine_math_german": [r.pairs[("math", "german")]["layers"][i].cosine for i in range(r.num_layers)]
                if ("math", "german") in r.pairs else None}

    def probe(self) -> dict:
        import surgery

        texts = {lang: str(self.sets / f"probe_{lang}.txt") for lang in ("en", LANG, *self.s.other_langs)}
        models = {"base": str(self.models["base"]), "german": str(self.models["german"]),
                  "math": str(self.models["math"])}
        r = surgery.probe(models, texts, parallel=[str(self.sets / f"parallel_en-{LANG}.jsonl")], device=self.device,
                          batch_size=16, max_tokens=64, seed=self.seed, progress=False)
        (self.out / "probe" / "probe.json").write_text(r.to_json())
        r.plot(self.out / "probe" / "probe.png")
        counts = {}
        for lang in texts:
            neurons = r.neurons(lang, model="base")
            path = self.out / "probe" / f"lape_{lang}.json"
            surgery.save_neuron_set(path, neurons, source=f"LAPE ({lang}) of the base model, surgery probe")
            counts[lang] = len(neurons)
        summary = r.to_dict()
        return {"neurons_per_language": counts,
                "probing": {m: (summary["models"][m].get("probing") or {}).get("accuracy")
                            for m in summary["models"]},
                "alignment": {m: summary["models"][m].get("alignment") for m in summary["models"]}}

    def masking(self) -> dict:
        """Zero one language's LAPE neurons in the base; perplexity in every language against the base's."""
        data = {lang: str(self.sets / f"text_{lang}.txt") for lang in ("en", LANG, *self.s.other_langs)}
        files = {lang: self.out / "probe" / f"lape_{lang}.json" for lang in self.s.mask_langs}
        rows = {"base": self._evaluate(self.models["base"], data)}
        for lang in self.s.mask_langs:
            path = self._save_recipe(f"zero_lape_{lang}", recipes.zero_neurons(self.models["base"], files[lang]))
            rows[f"zero {lang}"] = self._evaluate(path, data)
        return {"perplexity": {row: {lang: v[lang]["perplexity"] for lang in data} for row, v in rows.items()}}

    # ---- surgery --------------------------------------------------------------------------------
    def search(self, rows: list, save) -> dict:
        """`surgery search` over (bottom, top, transition) on the German dev problems; the best configuration
        is then evaluated on the test sets like every other row."""
        import surgery

        s = self.s
        spec = {"description": "layer swap (bottom, top, transition) on German dev problems",
                "recipe": recipes.search_space(self.models, *s.search_max),
                "objective": [{"data": str(self.sets / f"math_{LANG}_dev.jsonl"), "metric": "numeric_match",
                               "weight": 1.0},
                              {"data": str(self.sets / f"probe_{LANG}.txt"), "metric": "bits_per_byte",
                               "weight": -0.1}],
                "trials": s.search_trials, "sampler": "tpe", "seed": self.seed,
                "eval": {"batch_size": s.eval_batch, "max_new_tokens": s.max_new_tokens, "device": self.device}}
        path = self.out / "search" / "search.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
        self.log("$ surgery search OUT/search/search.yaml -o OUT/search/run")
        result = surgery.search(str(path), str(self.out / "search" / "run"))
        op = result.best_recipe["operations"][0]["layer_swap"]
        label = f"swap: searched b={op['bottom']}, u={op['top']}, t={op['transition']}"
        self._row(rows, label, "swap: search", self._save_recipe("swap_searched", result.best_recipe))
        save()
        return {"best": result.best, "trials": result.trials, "files": result.files}

    def table(self, rows: list, save) -> dict:
        """Base, experts, the analysis-chosen and hand swaps, and the merges, on the test sets; each row is
        appended to ``rows`` and saved as soon as it is measured."""
        s = self.s
        todo = [("base", "base", self.models["base"]), ("math expert", "expert", self.models["math"]),
                ("German expert", "expert", self.models["german"])]
        todo.append((f"swap: ranked_layer_swap k={s.ranked_k}, t={s.ranked_transition}", "swap: analysis",
                     self._save_recipe("swap_ranked", recipes.ranked_swap(self.models, s.ranked_k,
                                                                          s.ranked_transition))))
        for b, u, t in s.hand:
            todo.append((f"swap: hand b={b}, u={u}, t={t}", "swap: hand",
                         self._save_recipe(f"swap_b{b}_u{u}_t{t}", recipes.hand_swap(self.models, b, u, t))))
        for i, (label, recipe) in enumerate(recipes.baselines(self.models).items()):
            todo.append((label, "merge", self._save_recipe(f"merge_{i}", recipe)))
        done = {r["label"] for r in rows}  # rows of a resumed run are kept
        for label, kind, target in todo:
            if label not in done:
                self._row(rows, label, kind, target)
                save()
        return {k: str(v) for k, v in self.table_data().items()}

    def table_data(self) -> dict:
        return {"math_de": self.sets / f"math_{LANG}.jsonl", "math_en": self.sets / "math_en.jsonl",
                "text_de": self.sets / f"text_{LANG}.txt", "text_en": self.sets / "text_en.txt"}

    def _row(self, rows: list, label: str, kind: str, target) -> None:
        from surgery.eval.scores import EvalReport, EvalRow

        self.pace()
        self.log(f"eval {label}")
        scores, seconds = self._evaluate(target, self.table_data(), timed=True)
        rows.append({"label": label, "kind": kind, "target": str(target), "scores": scores, "seconds": seconds})
        report = EvalReport([EvalRow(r["label"], r["kind"], r["scores"], r["seconds"]) for r in rows])
        (self.out / "table.txt").write_text(report.format() + "\n")
        report.plot(self.out / "table.png")

    # ---- helpers --------------------------------------------------------------------------------
    def _save_recipe(self, name: str, recipe: dict) -> Path:
        path = self.out / "recipes" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
        return path

    def _evaluate(self, target, data: dict, timed: bool = False):
        import surgery

        report = surgery.evaluate([str(target)], {k: str(v) for k, v in data.items()}, device=self.device,
                                  batch_size=self.s.eval_batch, max_new_tokens=self.s.max_new_tokens, seed=self.seed)
        row = report.rows[0]
        return (row.scores, row.seconds) if timed else row.scores
