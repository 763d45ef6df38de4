"""mergekit-evolve configs through `surgery search`: the genome becomes the same genotype, lm-eval tasks score it."""

import json

import pytest
from eval_fixtures import write_mc_task
from search_kit import write_search

import surgery


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
