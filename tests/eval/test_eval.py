"""`surgery eval`: data files, recipes evaluated in memory (bitwise `surgery run`), lm-eval, report, CLI."""

import json
import subprocess
import sys

import pytest
import torch

from eval_fixtures import CHOICES, GENERATION, TEXTS, tiny_lm, write_jsonl, write_mc_task, write_text
from helpers import load, raw_bytes, run_cli
from surgery.errors import SurgeryError

SWAP = {"layer_swap": {"donor": "b", "bottom": 1, "top": 1, "transition": 1}}


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return {"a": tiny_lm(root / "a", seed=0, dtype=torch.bfloat16),
            "b": tiny_lm(root / "b", seed=1, dtype=torch.bfloat16),
            "ta": tiny_lm(root / "ta", seed=2, tie=True), "tb": tiny_lm(root / "tb", seed=3, tie=True)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"text": write_text(root / "texts.txt", TEXTS), "mc": write_jsonl(root / "mc.jsonl", CHOICES),
            "gen": write_jsonl(root / "gen.jsonl", GENERATION),
            "textl": write_jsonl(root / "texts.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS)])}


def recipe(lms, a="a", b="b", **output):
    return {"inputs": {"a": str(lms[a]), "b": str(lms[b])}, "recipient": "a", "operations": [SWAP],
            **({"output": output} if output else {})}


# ---------------------------------------------------------------- data files

def test_data_kinds_from_files(data):
    from surgery.eval import load_dataset

    assert [(d.kind, len(d)) for d in (load_dataset("t", data["text"]), load_dataset("l", data["textl"]),
                                        load_dataset("m", data["mc"]), load_dataset("g", data["gen"]))] == \
        [("text", 4), ("text", 4), ("choice", 6), ("generation", 3)]
    assert load_dataset("t", data["text"]).items == TEXTS == load_dataset("l", data["textl"]).items
    assert load_dataset("g", data["gen"]).items[0] == {"prompt": "Q: 2+3? A:", "answer": "5"}


def test_limit_draws_a_seeded_subset_in_file_order(data):
    from surgery.eval import load_dataset

    a, b = load_dataset("m", data["mc"], limit=3, seed=1), load_dataset("m", data["mc"], limit=3, seed=1)
    assert a.items == b.items and len(a) == 3
    assert [CHOICES.index(x) for x in a.items] == sorted(CHOICES.index(x) for x in a.items)
    assert any(load_dataset("m", data["mc"], limit=3, seed=s).items != a.items for s in range(2, 6))


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"text": "a"'], r"bad.jsonl:2: invalid JSON \(Expecting ',' delimiter at column 13\)"),
    (['{"prompt": "p", "answer": 1}', '', '{"text": "x"}'], r"bad.jsonl:3: a text record in a file of generation "
                                                            r"records"),
    (['{"prompt": "p", "choices": ["a"], "label": 0}'], r"bad.jsonl:1: 'choices' must be a list of at least two"),
    (['{"prompt": "p", "choices": ["a", "b"], "label": 2}'], r"bad.jsonl:1: 'label' must be an index"),
    (['{"question": "p"}'], r"bad.jsonl:1: cannot tell the record's kind"),
    (['[1, 2]'], r"bad.jsonl:1: expected a JSON object"),
    (['{"answer": 3}'], r"bad.jsonl:1: 'prompt' must be a string, and is missing"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, message):
    from surgery.eval import load_dataset

    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SurgeryError, match=message):
        load_dataset("bad", path)


def test_data_names_and_paths_are_checked(tmp_path, data):
    from surgery.eval import load_datasets

    with pytest.raises(SurgeryError, match="nope.txt: data file not found"):
        load_datasets(["x=" + str(tmp_path / "nope.txt")])
    with pytest.raises(SurgeryError, match="'mc' given twice"):
        load_datasets([f"mc={data['mc']}", f"mc={data['text']}"])
    (tmp_path / "d.csv").write_text("a\n")
    with pytest.raises(SurgeryError, match="unknown data format '.csv'"):
        load_datasets([str(tmp_path / "d.csv")])


# ---------------------------------------------------------------- recipes in memory

def state(model) -> dict:
    return {k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("pair, output", [(("a", "b"), {}), (("ta", "tb"), {"dtype": "bfloat16"})])
def test_recipe_in_memory_is_bitwise_the_written_output(lms, tmp_path, pair, output):
    import surgery
    from surgery.models import load_model

    r = recipe(lms, *pair, **output)
    written = surgery.run(r, tmp_path / "out").output
    model, _ = load_model(r)
    mem = state(model)
    disk = load(written)
    assert set(disk) <= set(mem)
    for name, tensor in disk.items():
        assert mem[name].dtype == tensor.dtype and raw_bytes(mem[name]) == raw_bytes(tensor), name
    loaded, _ = load_model(written)
    assert set(state(loaded)) == set(mem)
    for name, tensor in state(loaded).items():
        assert raw_bytes(mem[name]) == raw_bytes(tensor), name
    if pair[0] == "ta":  # tied embeddings: stored once, one parameter in memory
        assert "lm_head.weight" not in disk and model.lm_head.weight is model.model.embed_tokens.weight


def test_recipe_and_written_output_give_the_same_numbers(lms, data, tmp_path):
    import surgery

    r = recipe(lms)
    out = surgery.run(r, tmp_path / "out").output
    report = surgery.evaluate([r, out, lms["a"]], {"t": data["text"], "m": data["mc"]}, device="cpu")
    mem, disk, base = (row.scores for row in report.rows)
    assert mem == disk
    assert mem["t"]["perplexity"] != base["t"]["perplexity"]
    assert [row.kind for row in report.rows] == ["recipe", "checkpoint", "checkpoint"]


def test_evaluate_recipe_reuses_loaded_data(lms, data):
    from surgery import load_recipe
    from surgery.eval import evaluate_checkpoint, evaluate_recipe, load_datasets

    datasets = load_datasets({"t": data["text"], "g": data["gen"]})
    first = evaluate_recipe(load_recipe(recipe(lms)), datasets, device="cpu", max_new_tokens=4)
    again = evaluate_recipe(load_recipe(recipe(lms)), datasets, device="cpu", max_new_tokens=4)
    specs = evaluate_recipe(recipe(lms), {"t": data["text"], "g": data["gen"]}, device="cpu", max_new_tokens=4)
    assert first == again == specs and set(first) == {"t", "g"} and set(first["g"]) == {"exact_match", "numeric_match"}
    assert first != evaluate_checkpoint(lms["a"], datasets, device="cpu", max_new_tokens=4)


def test_evaluated_models_are_freed_with_a_full_collection_only_where_a_cycle_needs_it(lms, data, monkeypatch):
    """A search evaluates one model per trial: each must be freed when its scores are back, and a full
    gc.collect() (~0.7 s with torch and transformers loaded) is paid only where a reference cycle holds the model
    (transformers' from_pretrained leaves some, e.g. through exceptions caught during its first imports)."""
    import gc
    import weakref

    from surgery import models
    from surgery.eval import api

    built, collections = [], []

    def spy(name, cycle):
        real = models.load_model

        def load(*args, **kw):
            model, tok = real(*args, **kw)
            if cycle:
                object.__setattr__(model, "_cycle", [model])
            built.append([weakref.ref(p) for p in model.parameters()])
            return model, tok
        return load

    real_collect = gc.collect
    monkeypatch.setattr(api.gc, "collect", lambda *a: collections.append(1) or real_collect(*a))
    datasets = api.load_datasets({"t": data["text"]})
    gc.disable()  # no automatic collection: what frees the models is evaluate_*'s doing
    try:
        for name, cycle, evaluate, target in (("recipe_model", False, api.evaluate_recipe, recipe(lms)),
                                              ("load_checkpoint_model", True, api.evaluate_checkpoint, lms["a"])):
            monkeypatch.setattr(models, "load_model", spy(name, cycle))
            del collections[:]
            evaluate(target, datasets, device="cpu")
            assert built[-1] and all(r() is None for r in built[-1]), name
            assert collections == ([1] if cycle else []), name
    finally:
        gc.enable()


def test_dtype_option_casts_after_the_exact_weights(lms):
    from surgery.models import load_model

    model, _ = load_model(recipe(lms), dtype="float32")
    exact, _ = load_model(recipe(lms))
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.model.embed_tokens.weight, exact.model.embed_tokens.weight.float())


# ---------------------------------------------------------------- lm-eval

def test_lm_eval_local_task_matches_builtin_multiple_choice(lms, data, tmp_path, monkeypatch):
    import surgery

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    write_mc_task(tasks, data["mc"])
    # float32 models: lm-eval takes the log-softmax in the model's dtype, the built-in one in float32
    report = surgery.evaluate([lms["ta"], recipe(lms, "ta", "tb")], {"mc": data["mc"]}, lm_eval="local_mc",
                              include_path=tasks, device="cpu")
    for row in report.rows:
        assert row.scores["local_mc"] == row.scores["mc"], row.target
    accs = {row.scores["mc"]["acc"] for row in report.rows} | {row.scores["mc"]["acc_norm"] for row in report.rows}
    assert len(accs) > 1  # not a constant


@pytest.mark.slow  # indexes all of lm-eval's own tasks (~20 s)
def test_lm_eval_unknown_task(lms, tmp_path):
    import surgery

    (tmp_path / "empty").mkdir()
    with pytest.raises(SurgeryError, match="unknown task 'no_such_task_xyz'"):
        surgery.evaluate(lms["a"], lm_eval="no_such_task_xyz", include_path=tmp_path / "empty", device="cpu")


# ---------------------------------------------------------------- report and CLI

def cli(*args):
    return run_cli(*args)


def test_cli_error_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "surgery", "eval", str(tmp_path), "--data", f"x={tmp_path / 'no.txt'}"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr == f"error: {tmp_path / 'no.txt'}: data file not found\n"


def test_cli_json_csv_plot(lms, data, tmp_path):
    import csv

    rec = tmp_path / "swap.yaml"
    rec.write_text(json.dumps(recipe(lms)))
    r = cli("eval", lms["a"], rec, "--data", f"sw={data['text']}", "--data", data["mc"], "--json",
            "--csv", tmp_path / "s.csv", "--plot", tmp_path / "p.png", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["schema"] == "surgery.eval/1"
    assert [x["target"] for x in report["results"]] == [str(lms["a"]), str(rec)]
    assert [d["name"] for d in report["datasets"]] == ["sw", "mc"]
    assert set(report["results"][1]["scores"]) == {"sw", "mc"}
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert len(rows) == 2 * 4
    got = {(x["target"], x["data"], x["metric"]): float(x["value"]) for x in rows}
    for res in report["results"]:
        for d, ms in res["scores"].items():
            for m, v in ms.items():
                assert got[(res["target"], d, m)] == v
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = cli("eval", lms["a"], "--data", f"sw={data['text']}", "-q")
    assert table.returncode == 0 and "sw perplexity" in table.stdout.splitlines()[0]
    value = report["results"][0]["scores"]["sw"]["perplexity"]
    assert f"{value:.4g}" in table.stdout or f"{value:.4f}" in table.stdout


def test_cli_errors_are_one_line(lms, data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 7}\n')
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (notok / f).write_bytes((lms["a"] / f).read_bytes())
    badcfg = tmp_path / "badcfg"
    badcfg.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (badcfg / f).write_bytes((lms["a"] / f).read_bytes())
    (badcfg / "config.json").write_text(json.dumps({"model_type": "no_such_arch", "hidden_size": 8}))
    rec = tmp_path / "r.yaml"
    rec.write_text(json.dumps({"inputs": {"a": str(notok), "b": str(lms["b"])}, "recipient": "a",
                               "operations": [SWAP]}))
    cases = [
        ((lms["a"], "--data", f"x={tmp_path / 'missing.txt'}"), f"{tmp_path / 'missing.txt'}: data file not found"),
        ((lms["a"], "--data", bad), f"{bad}:2: 'text' must be a string"),
        ((notok, "--data", data["text"]), f"{notok}: no tokenizer files"),
        ((rec, "--data", data["text"]), f"{notok}: no tokenizer files"),
        ((badcfg, "--data", data["text"]), "config.json: transformers cannot build a model from this config: "
                                           "unknown model_type 'no_such_arch'"),
        ((tmp_path / "nothing", "--data", data["text"]), f"checkpoint not found: '{tmp_path / 'nothing'}' is neither "
                                                         "a local path nor a Hub id"),
    ]
    for args, message in cases:
        r = cli("eval", *args)
        assert r.returncode == 1, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    r = cli("eval", lms["a"])
    assert r.returncode == 1 and "give --data NAME=PATH or --lm-eval TASKS" in r.stderr
    assert cli("eval", lms["a"], "--data", data["text"], "--batch-size", "0").returncode == 2


def test_recipe_whose_config_cannot_be_built(lms, tmp_path, data):
    from surgery.models import load_model

    badcfg = tmp_path / "a"
    badcfg.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (badcfg / f).write_bytes((lms["a"] / f).read_bytes())
    cfg = json.loads((lms["a"] / "config.json").read_text())
    cfg["num_attention_heads"] = 5  # hidden 32 is not divisible by 5 heads
    (badcfg / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SurgeryError, match=r"a/config.json: transformers cannot build"):
        load_model({"inputs": {"a": str(badcfg)}, "operations": []})


def test_eval_help():
    r = cli("eval", "--help")
    assert r.returncode == 0 and "Examples:" in r.stdout and "--lm-eval" in r.stdout


def test_tokenizer_is_loaded_once_while_its_files_are_unchanged(lms, tmp_path):
    import os
    import shutil

    from surgery.models import load_tokenizer

    folder = shutil.copytree(lms["a"], tmp_path / "tok")
    first = load_tokenizer(folder)
    assert load_tokenizer(folder) is first
    st = os.stat(folder / "tokenizer.json")
    os.utime(folder / "tokenizer.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = load_tokenizer(folder)
    assert again is not first and again("abc").input_ids == first("abc").input_ids
