"""`surgery search`: a known optimum found by grid and TPE, resume after SIGKILL, Ray = serial, bad files.

The objective's optimum is known by construction: the text is sampled from the model that a layer
swap with bottom=2, top=2 produces (math expert + Swahili expert of the demo, lm_head sharpened so
the models are far from uniform, with a word-level tokenizer so sampled token ids are the text
exactly). The expected negative log-likelihood of a model on samples of q is smallest at q.
"""

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from eval_fixtures import write_mc_task
from helpers import run_cli

import surgery
from surgery.errors import RecipeError

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 512
SWAP = "bottom: {int: [1, 4]}, top: {int: [1, 4]}"


def save_word_tokenizer(folder: Path) -> None:
    """Tokens w000..w511 (one width, so the special tokens match only whole words), split on spaces;
    w000 is BOS (the prefix the evaluator scores after)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i:03d}": i for i in range(VOCAB)}, unk_token="w001"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w000", eos_token="w000",
                            unk_token="w001").save_pretrained(folder)


def swap_recipe(root: Path, bottom: int, top: int) -> dict:
    return {"inputs": {"math": str(root / "math"), "sw": str(root / "swahili")}, "recipient": "math",
            "operations": [{"layer_swap": {"donor": "sw", "bottom": bottom, "top": top}}]}


def nll_by_hand(model_dir: Path, docs: list[list[int]]) -> float:
    """Mean negative log-likelihood per token after the BOS prefix, with transformers directly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[0] + d for d in docs])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, :-1].double(), -1)
    return float(-logp.gather(2, ids[:, 1:, None]).mean())


@pytest.fixture(scope="session")
def swap_world(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    ck = demo_dir / "checkpoints"
    for name in ("math", "swahili"):
        surgery.run({"inputs": {"m": str(ck / name)},
                     "operations": [{"arithmetic": {"expr": "20*m", "select": {"modules": ["lm_head"]}}}]}, root / name)
        save_word_tokenizer(root / name)
    surgery.run(swap_recipe(root, 2, 2), root / "generator")
    from transformers import AutoModelForCausalLM

    gen = AutoModelForCausalLM.from_pretrained(root / "generator", dtype=torch.float32).eval()
    torch.manual_seed(0)
    seq = torch.zeros(16, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(63):
            seq = torch.cat([seq, torch.multinomial(torch.softmax(gen(seq).logits[:, -1], -1), 1)], 1)
    docs = [row[1:].tolist() for row in seq]
    (root / "gen.txt").write_text("".join(" ".join(f"w{i:03d}" for i in d) + "\n" for d in docs))
    return root, docs


def write_search(root: Path, name: str, body: str) -> Path:
    path = root / name
    path.write_text(body)
    return path


def swap_search(root: Path, sampler="grid", trials=16, swap=SWAP, extra="", name=None) -> Path:
    return write_search(root, name or f"search-{sampler}.yaml", f"""\
recipe:
  inputs: {{math: math, sw: swahili}}
  recipient: math
  operations:
    - layer_swap: {{donor: sw, {swap}}}
objective:
  - {{data: gen.txt, metric: perplexity, weight: -1}}
trials: {trials}
sampler: {sampler}
eval: {{dtype: float32}}
{extra}""")


SMALL = "bottom: {int: [1, 3]}, top: {int: [1, 2]}"  # 6 of the 16 configurations


def by_config(rows):
    keys = [k for k in rows[0] if k.startswith("operations.")]
    return {tuple(r[k] for k in keys): r["value"] for r in rows if r["state"] == "complete"}


@pytest.fixture(scope="session")
def grid_run(swap_world, tmp_path_factory):
    root, _ = swap_world
    out = tmp_path_factory.mktemp("grid")
    return surgery.search(swap_search(root), out, write_best=True)


# ---------------------------------------------------------------------------- the known optimum

def test_grid_finds_the_known_optimum(swap_world, grid_run):
    root, docs = swap_world
    result = grid_run
    assert len(result.trials) == 16 and result.evaluated == 16
    assert all(r["state"] == "complete" for r in result.trials)
    best = result.best
    assert (best["operations.0.layer_swap.bottom"], best["operations.0.layer_swap.top"]) == (2, 2)
    # every value is -perplexity, the generator's measured independently with transformers
    assert best["value"] == pytest.approx(-math.exp(nll_by_hand(root / "generator", docs)), rel=1e-5)
    assert best["gen.txt:perplexity"] == pytest.approx(-best["value"])
    values = sorted(r["value"] for r in result.trials)
    assert values[-1] > values[-2]  # a unique optimum
    # best.yaml is a plain recipe that `surgery run` takes; --write-best wrote the generator's bytes
    assert result.best_recipe == json.loads(json.dumps(swap_recipe(root, 2, 2) | {
        "inputs": {"math": "math", "sw": "swahili"}}))
    from safetensors.torch import load_file

    gen = load_file(root / "generator" / "model.safetensors")
    for out in (result.output / "best", surgery.run(result.output / "best.yaml", result.output / "rerun").output):
        got = load_file(out / "model.safetensors")
        assert got.keys() == gen.keys() and all(torch.equal(got[k], gen[k]) for k in gen)


def test_outputs_table_json_plots(grid_run):
    out = grid_run.output
    import csv

    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert [int(r["trial"]) for r in rows] == list(range(16))
    assert {"operations.0.layer_swap.bottom", "operations.0.layer_swap.top", "gen.txt:perplexity", "hash"} <= set(rows[0])
    data = json.loads((out / "trials.json").read_text())
    assert data["format"] == "surgery.search/1" and data["best"]["trial"] == grid_run.best["trial"]
    assert [r["value"] for r in data["trials"]] == [float(r["value"]) for r in rows]
    for png in ("objective.png", "importance.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    importance = json.loads((out / "importance.json").read_text())
    assert set(importance) == {"operations.0.layer_swap.bottom", "operations.0.layer_swap.top"}
    assert sum(importance.values()) == pytest.approx(1.0)


def test_rerun_of_a_finished_search_evaluates_nothing(swap_world, grid_run):
    root, _ = swap_world
    again = surgery.search(swap_search(root), grid_run.output)
    assert again.evaluated == 0 and by_config(again.trials) == by_config(grid_run.trials)


def test_tpe_finds_the_optimum_within_budget(swap_world, grid_run, tmp_path):
    root, _ = swap_world
    result = surgery.search(swap_search(root, "tpe", trials=20), tmp_path)
    assert len(result.trials) == 20
    best = result.best
    assert (best["operations.0.layer_swap.bottom"], best["operations.0.layer_swap.top"]) == (2, 2)
    assert best["value"] == pytest.approx(grid_run.best["value"], rel=1e-9)
    # repeated configurations were measured once: the cache gives them the first value, so TPE's
    # 20 trials measured fewer configurations than the grid's 16
    cached = [r for r in result.trials if r["cached_from"] is not None]
    assert result.evaluated == 20 - len(cached) == len({r["hash"] for r in result.trials}) < 16
    for r in cached:
        assert r["value"] == result.trials[r["cached_from"]]["value"]


# ---------------------------------------------------------------------------- resume, Ray

@pytest.mark.slow
def test_sigkill_mid_search_then_rerun_equals_an_uninterrupted_run(swap_world, grid_run, tmp_path):
    root, _ = swap_world
    search_file = swap_search(root, trials=6, swap=SMALL, name="small.yaml")
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "surgery", "search", str(search_file), "-o", str(out), "-q"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_before, deadline = [], time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
            if not (out / "study.db").exists():
                continue
            try:
                with sqlite3.connect(out / "study.db") as db:  # (state, signed: its recipe is being evaluated)
                    states = db.execute("SELECT number, state, EXISTS(SELECT 1 FROM trial_user_attributes a WHERE "
                                        "a.trial_id = t.trial_id AND a.key = 'hash') FROM trials t ORDER BY number"
                                        ).fetchall()
            except sqlite3.OperationalError:
                continue  # tables not created yet, or locked
            if sum(s == "COMPLETE" for _, s, _ in states) >= 2 and states[-1][1:] == ("RUNNING", 1):
                proc.send_signal(signal.SIGKILL)  # in the trial's evaluation (or, rarely, already in the next ask)
                proc.wait()
                done_before = [n for n, s, _ in states if s == "COMPLETE"]
                break
    finally:
        if proc.poll() is None:
            proc.kill()
    assert done_before, f"the search was not caught mid-way: {proc.stderr.read().decode()[-500:]}"
    import optuna

    killed = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}").trials
    before = {t.number: t.value for t in killed if t.state.name == "COMPLETE"}  # as the kill left them
    interrupted = [t for t in killed if t.state.name == "RUNNING"]
    assert len(interrupted) == 1 and len(before) >= 2
    result = surgery.search(search_file, out)
    assert result.evaluated == 6 - len(before)       # nothing finished is evaluated again; the interrupted one is
    assert {r["trial"]: r["value"] for r in result.trials if r["trial"] in before} == before
    assert interrupted[0].number not in {r["trial"] for r in result.trials}
    reference = by_config(grid_run.trials)             # the uninterrupted run's values for the same configurations
    assert len(result.trials) == 6 and by_config(result.trials) == pytest.approx(
        {k: reference[k] for k in by_config(result.trials)}) and len(by_config(result.trials)) == 6
    redone = [t for t in optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}").trials
              if t.user_attrs.get("redo_of") == interrupted[0].number]
    if "grid_id" not in interrupted[0].system_attrs:  # killed inside ask() before the grid sampler gave it a
        assert redone == []                           # point: nothing to redo, the grid samples that point anew
        return
    assert len(redone) == 1 and redone[0].state.name == "COMPLETE"
    # a kill inside ask() leaves none or some of the parameters: the redo runs the whole grid point
    assert interrupted[0].params.items() <= redone[0].params.items() and len(redone[0].params) == 2


@pytest.mark.slow
def test_ray_with_two_workers_matches_serial(swap_world, grid_run, tmp_path):
    root, _ = swap_world
    result = surgery.search(swap_search(root, trials=6, swap=SMALL, name="small-ray.yaml"), tmp_path, workers=2)
    reference = by_config(grid_run.trials)
    got = by_config(result.trials)
    assert result.evaluated == 6 == len(got) and got == pytest.approx({k: reference[k] for k in got}, rel=1e-9)
    assert result.best["trial"] in {r["trial"] for r in result.trials}
    import ray

    assert not ray.is_initialized()  # the local Ray started for the search is shut down


# ---------------------------------------------------------------------------- spaces

def test_analysis_guided_space_ranked_swap_count(swap_world, tmp_path):
    root, _ = swap_world
    path = write_search(root, "ranked.yaml", """\
recipe:
  inputs: {math: math, sw: swahili}
  recipient: math
  operations:
    - ranked_layer_swap: {donor: sw, k: {int: [1, 3]}, split: outer}
objective:
  - {data: gen.txt, metric: bits_per_byte, weight: -1}
sampler: grid
trials: 3
""")
    result = surgery.search(path, tmp_path)
    assert sorted(r["operations.0.ranked_layer_swap.k"] for r in result.trials) == [1, 2, 3]
    assert all(r["state"] == "complete" and r["value"] < 0 for r in result.trials)
    assert isinstance(result.best_recipe["operations"][0]["ranked_layer_swap"]["k"], int)


def test_per_layer_variables_split_a_merge_by_layer_group(demo_dir, tmp_path):
    from surgery.search.space import resolve

    ck = demo_dir / "checkpoints"
    text = f"""\
recipe:
  inputs: {{math: {ck / 'math'}, sw: {ck / 'swahili'}}}
  operations:
    - merge:
        method: linear
        models:
          math: {{weight: {{float: [0, 1], layer_granularity: 4}}}}
          sw: {{weight: 0.5}}
        parameters: {{normalize: false}}
objective:
  - {{data: {ck.parent / 'doc.txt'}, metric: perplexity}}
"""
    (ck.parent / "doc.txt").write_text("hello world\n")
    spec = surgery.load_search(write_search(tmp_path, "s.yaml", text))
    assert spec.param_names() == ["operations.0.merge.models.math.weight[0-3]", "operations.0.merge.models.math.weight[4-7]"]
    plain = resolve(spec.recipe, spec.variables, dict(zip(spec.param_names(), [0.25, 0.75])))
    merges = [op["merge"] for op in plain["operations"]]
    assert [m["models"]["math"]["weight"] for m in merges] == [0.25, 0.75, 0.75]
    assert [m.get("select") for m in merges] == [None, {"layers": "4-7"},
                                                 {"modules": ["final_norm", "lm_head"], "missing": "skip"}]
    from safetensors.torch import load_file

    got = load_file(surgery.run(plain, tmp_path / "out").output / "model.safetensors")
    a, b = load_file(ck / "math" / "model.safetensors"), load_file(ck / "swahili" / "model.safetensors")
    for name, w in (("model.layers.1.mlp.up_proj.weight", 0.25), ("model.layers.6.mlp.up_proj.weight", 0.75),
                    ("model.embed_tokens.weight", 0.25), ("lm_head.weight", 0.75), ("model.norm.weight", 0.75)):
        want = (w * a[name].float() + 0.5 * b[name].float()).to(torch.bfloat16)
        assert torch.allclose(got[name].float(), want.float(), rtol=1e-2, atol=1e-3), name


# ---------------------------------------------------------------------------- bad search files

BAD = {
    "float where the schema takes an int": ("bottom: {float: [0, 2]}, top: 1", "recipe.operations.0.layer_swap.bottom",
                                            "the float variable's value 0.74 is not valid here: Input should be a valid integer"),
    "choice outside a literal": ("layers: {choice: ['0-1', 3]}, embeddings: {choice: [donor, nowhere]}",
                                 "recipe.operations.0.layer_swap.embeddings",
                                 "the choice variable's value 'nowhere' is not valid here"),
    "empty range": ("bottom: {int: [3, 1]}", "recipe.operations.0.layer_swap.bottom", "empty range [3, 1]"),
    "empty choice": ("bottom: {choice: []}", "recipe.operations.0.layer_swap.bottom", "empty choice"),
    "unknown variable key": ("bottom: {int: [0, 3], scale: log}", "recipe.operations.0.layer_swap.bottom",
                             "unknown key 'scale' in a search variable"),
    "float grid without a step": ("bottom: 1, embeddings: {float: [0, 1]}", "recipe.operations.0.layer_swap.embeddings",
                                  "the grid sampler needs a step"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_variables_are_one_line_with_file_and_line(swap_world, case):
    root, _ = swap_world
    swap, where, message = BAD[case]
    path = swap_search(root, swap=swap)
    r = run_cli("search", path, "-o", root / "never")
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {path}:5: {where}: ") and message in r.stderr, r.stderr
    assert not (root / "never").exists()


@pytest.mark.parametrize("extra,where,message", [
    ("objective:\n  - {data: gen.txt, metric: perplexty}", ":10: objective.0", "unknown metric 'perplexty'; did you mean 'perplexity'?"),
    ("objective:\n  - {data: gen.txt, metric: acc}", ":10: objective.0", "metric acc needs choice data; gen.txt holds text data"),
    ("objective:\n  - {data: nothing.txt, metric: perplexity}", ":10: objective.0", "data file not found"),
    ("trials: {int: [1, 5]}", ":10: trials", "search variables go inside the recipe"),
    ("eval: {batch: 4}", ":10: eval.batch", "unknown eval option 'batch'; did you mean 'batch_size'?"),
    ("samplr: tpe", ":11: samplr", "unknown key 'samplr'; did you mean 'sampler'?"),
])
def test_bad_settings_are_one_line_with_file_and_line(swap_world, extra, where, message):
    root, _ = swap_world
    text = swap_search(root).read_text()
    for key in ("objective", "trials", "eval"):  # replace the setting the case gives
        if extra.startswith(key + ":"):
            text = "\n".join(line for line in text.splitlines() if not line.startswith(key) and
                             not (key == "objective" and line.startswith("  - {data"))) + "\n"
    path = write_search(root, "bad.yaml", text + extra + "\n")
    with pytest.raises(RecipeError) as e:
        surgery.load_search(path)
    assert str(e.value).startswith(f"{path}{where}") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_cli_json_and_storage_url(swap_world, tmp_path):
    root, _ = swap_world
    db = tmp_path / "elsewhere.db"
    r = run_cli("search", swap_search(root, "random", trials=1), "-o", tmp_path / "out", "--storage",
                f"sqlite:///{db}", "--json", "--seed", "3")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["format"] == "surgery.search/1" and len(data["trials"]) == 1 and data["storage"].endswith("elsewhere.db")
    assert db.exists() and not (tmp_path / "out" / "study.db").exists()
    assert (tmp_path / "out" / "best.yaml").exists()
    # the live table: a header, then one line per finished trial (here the second, resumed with a new budget)
    r = run_cli("search", swap_search(root, "random", trials=1), "-o", tmp_path / "out", "--storage",
                f"sqlite:///{db}", "--seed", "3", "--trials", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["trial", "value", "best"] and lines[0].split()[3:5] == ["bottom", "top"]
    row = lines[1].split()
    trial = json.loads((tmp_path / "out" / "trials.json").read_text())["trials"][1]
    assert row[0] == "1" and float(row[1]) == pytest.approx(trial["value"], rel=1e-4)
    assert row[3:5] == [str(trial["operations.0.layer_swap.bottom"]), str(trial["operations.0.layer_swap.top"])]
    assert lines[2].startswith("2 trials (2 complete, 1 evaluated now)") and "best: trial" in lines[3]


# ---------------------------------------------------------------------------- mergekit-evolve configs

MC = [{"prompt": "2 + 2 =", "choices": ["4", "5", "22"], "label": 0},
      {"prompt": "The sky is", "choices": ["blue", "green"], "label": 0},
      {"prompt": "Water is", "choices": ["dry", "wet", "a rock"], "label": 1},
      {"prompt": "Fire is", "choices": ["hot", "cold"], "label": 0},
      {"prompt": "Ice is", "choices": ["warm", "cold", "loud"], "label": 1},
      {"prompt": "Cats say", "choices": ["meow", "moo"], "label": 0}]


def test_mergekit_evolve_genome_translates_to_the_same_genotype(demo_dir, tmp_path):
    ck = demo_dir / "checkpoints"
    path = write_search(tmp_path, "evolve.yml", f"""\
genome:
  models: [{ck / 'math'}, {ck / 'swahili'}]
  merge_method: ties
  base_model: {ck / 'base'}
  layer_granularity: 4
  filters: [mlp]
tasks:
  - name: some_task
    weight: 0.5
""")
    spec = surgery.load_search(path)
    assert spec.sampler == "cmaes" and [t.model_dump(exclude_none=True) for t in spec.objective] == [
        {"lm_eval": "some_task", "metric": "acc", "weight": 0.5}]
    assert spec.recipe["inputs"] == {"math": str(ck / "math"), "swahili": str(ck / "swahili"), "base": str(ck / "base")}
    body = spec.recipe["operations"][0]["merge"]
    assert body["parameters"] == {"normalize": True, "int8_mask": True} and body["dtype"] == "bfloat16"
    # 2 layer groups x 2 models x 2 parameter sets (mlp, rest) x 2 parameters (weight, density)
    assert len(spec.param_names()) == 16
    assert all(v.low == 0.0 and v.high == 1.0 and [g for g in v.groups] == [(0, 3), (4, 7)] for v in spec.variables)
    assert body["models"]["math"]["density"][0]["filter"] == "mlp"
    sampled = {n: (i + 1) / 20 for i, n in enumerate(spec.param_names())}
    plain = spec.resolve(sampled)
    assert len(plain["operations"]) == 3  # group 0 (all tensors), layers 4-7, final norm + lm_head
    w = plain["operations"][1]["merge"]["models"]["swahili"]["weight"]
    assert w == [{"filter": "mlp", "value": sampled["operations.0.merge.models.swahili.weight.0.value[4-7]"]},
                 {"value": sampled["operations.0.merge.models.swahili.weight.1.value[4-7]"]}]
    surgery.build_plan(surgery.load_recipe(plain))  # a valid recipe
    # the first trial is mergekit-evolve's starting genotype: weights 1/2, densities 1
    assert spec.initial == {n: 0.5 if ".weight." in n else 1.0 for n in spec.param_names()}


@pytest.mark.slow
def test_mergekit_evolve_config_runs_through_lm_eval(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ck = demo_dir / "checkpoints"
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    write_mc_task(tmp_path / "tasks", tmp_path / "mc.jsonl", metrics=("acc",))
    path = write_search(tmp_path, "evolve.yml", f"""\
genome:
  models: [{ck / 'math'}, {ck / 'swahili'}]
  merge_method: task_arithmetic
  base_model: {ck / 'base'}
tasks:
  - {{name: local_mc, weight: 2.0, metric: "acc,none"}}
apply_chat_template: false
trials: 2
sampler: random
eval: {{include_path: tasks, dtype: float32}}
""")
    result = surgery.search(path, tmp_path / "out")
    assert len(result.trials) == 2 and all(r["state"] == "complete" for r in result.trials)
    assert [v for k, v in result.trials[0].items() if k.startswith("operations.")] == [0.5, 0.5]  # the starting point
    for row in result.trials:
        recipe = json.loads(_trial_recipe(result, row["trial"]))
        builtin = surgery.evaluate([recipe], {"mc": tmp_path / "mc.jsonl"}, dtype="float32", device="cpu")
        assert row["value"] == pytest.approx(2.0 * builtin.rows[0].scores["mc"]["acc"])
        assert row["local_mc:acc"] == builtin.rows[0].scores["mc"]["acc"]


def _trial_recipe(result, number: int) -> str:
    import optuna

    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    return study.trials[number].user_attrs["recipe"]


def test_per_layer_groups_on_a_tied_model_skip_its_missing_lm_head(tmp_path):
    """A tied model (SmolLM2's shape) has no lm_head tensor: the last group's copy gives the final norm its
    values and skips lm_head, as mergekit skips it in a genome's slices config."""
    from helpers import save_checkpoint, tied_config, tied_state

    from surgery.search.space import resolve

    cfg = tied_config("llama", architectures=["LlamaForCausalLM"])
    a, b = (save_checkpoint(tmp_path / n, tied_state(cfg, seed=i), cfg) for i, n in enumerate("ab"))
    (tmp_path / "doc.txt").write_text("hello world\n")
    spec = surgery.load_search(write_search(tmp_path, "s.yaml", f"""\
recipe:
  inputs: {{a: {a}, b: {b}}}
  operations:
    - merge: {{method: linear, models: {{a: {{weight: {{float: [0, 1], layer_granularity: 4}}}}, b: {{weight: 1}}}}}}
objective:
  - {{data: doc.txt, metric: perplexity}}
"""))
    plan = surgery.build_plan(resolve(spec.recipe, spec.variables, dict(zip(spec.param_names(), [0.25, 0.75]))))
    assert "#3 merge: skipped, this model ties lm_head to the embeddings (tie_word_embeddings), so it has no " \
           "lm_head tensor (missing: skip)" in plan.annotations
    rules = {e.name: e.rule for e in plan.entries}
    assert (rules["model.norm.weight"], rules["model.layers.5.mlp.up_proj.weight"]) == ("#3 merge", "#2 merge")
    assert "lm_head.weight" not in rules


def test_a_choice_of_whole_operations_is_sampled_by_index(swap_world):
    root, _ = swap_world
    path = write_search(root, "ops.yaml", """\
recipe:
  inputs: {math: math, sw: swahili}
  recipient: math
  operations:
    - choice:
        - layer_swap: {donor: sw, bottom: 2}
        - take: {from: sw, select: {layers: '0-1'}}
objective:
  - {data: gen.txt, metric: perplexity, weight: -1}
sampler: grid
""")
    spec = surgery.load_search(path)
    assert spec.grid_space() == {"operations.0": [0, 1]}
    assert spec.resolve({"operations.0": 1})["operations"] == [{"take": {"from": "sw", "select": {"layers": "0-1"}}}]
    bad = write_search(root, "ops-bad.yaml", path.read_text().replace("take: {from: sw", "take: {form: sw"))
    with pytest.raises(RecipeError, match=r"ops-bad.yaml:5: recipe.operations.0: the choice variable's value .* is not valid here: .*"
                                          r"unknown key 'form'"):
        surgery.load_search(bad)


def test_bad_storage_url_and_grid_override_are_one_line(swap_world, tmp_path):
    root, _ = swap_world
    r = run_cli("search", swap_search(root), "-o", tmp_path / "a", "--storage", "nosuchdb://x/y")
    assert r.returncode == 1 and r.stderr.startswith("error: cannot open the study store 'nosuchdb://x/y'"), r.stderr
    assert r.stderr.count("\n") == 1
    path = swap_search(root, "tpe", swap="bottom: 2, embeddings: {float: [0, 1]}", name="float.yaml")
    r = run_cli("search", path, "-o", tmp_path / "b", "--sampler", "grid")
    assert r.returncode == 1 and "the grid sampler needs a step for a float variable" in r.stderr, r.stderr


def test_a_trial_killed_before_the_grid_gave_it_a_point_is_not_redone(swap_world, tmp_path):
    """ask() creates the trial, then the grid sampler gives it a point: a kill in between leaves a RUNNING trial
    with nothing to redo. It is marked interrupted, nothing is queued, and the next trial gets a grid point anew."""
    from surgery.search.study import count_finished, open_study, redo_interrupted

    root, _ = swap_world
    spec = surgery.load_search(swap_search(root))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(spec, storage)
    number = study._storage.get_trial(study._storage.create_new_trial(study._study_id)).number
    resumed = open_study(spec, storage)
    assert redo_interrupted(resumed) == [number] and count_finished(resumed) == 0
    nxt = resumed.ask(fixed_distributions=spec.distributions())
    assert "redo_of" not in nxt.user_attrs and set(nxt.params) == set(spec.param_names())
    assert "grid_id" in resumed._storage.get_trial(nxt._trial_id).system_attrs


@pytest.mark.parametrize("sampled", [0, 1], ids=["before-sampling", "mid-sampling"])
def test_a_trial_killed_inside_ask_is_redone_at_its_whole_grid_point(swap_world, tmp_path, sampled):
    """ask() creates the trial and the grid sampler gives it a grid point before the parameters are sampled
    one by one and the trial is signed: a kill in that window leaves an unsigned RUNNING trial with none or
    some of its parameters, which the next run redoes with all of them (CI caught the mid-sampling kill)."""
    from surgery.search.study import open_study, redo_interrupted

    root, _ = swap_world
    spec = surgery.load_search(swap_search(root))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(spec, storage)
    trial = study.ask()  # a RUNNING trial with a grid id and no parameters yet
    for name in spec.param_names()[:sampled]:
        trial._suggest(name, spec.distributions()[name])
    assert len(study._storage.get_trial(trial._trial_id).params) == sampled
    grid_id = study._storage.get_trial(trial._trial_id).system_attrs["grid_id"]
    resumed = open_study(spec, storage)  # as a new process would open it: the same grid order
    point = resumed.sampler.point(grid_id)
    assert point == study.sampler.point(grid_id) and set(point) == set(spec.param_names())
    assert redo_interrupted(resumed) == [trial.number]
    queued = resumed.ask(fixed_distributions=spec.distributions())
    assert queued.params == point and queued.user_attrs["redo_of"] == trial.number
