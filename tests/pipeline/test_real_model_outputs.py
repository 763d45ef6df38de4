"""Issue 16, continued: threads and seeds, adapters PEFT's auto classes load, diff of adapters, full neuron
provenance and plots, on tiny models with tied embeddings and grouped-query attention."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from helpers import load, perturb, raw_bytes, save_checkpoint, tied_config as tied, tied_state as saved_state

import surgery
from surgery.cli import cli

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
Q3 = "model.layers.3.self_attn.q_proj.weight"


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    cfg = tied("llama")
    base = saved_state(cfg)
    return {"base": save_checkpoint(root / "base", base, cfg),
            "tuned": save_checkpoint(root / "tuned", perturb(base, None, 0.02, seed=5), cfg),
            "lang": save_checkpoint(root / "lang", perturb(base, [1, 2], 0.05, seed=6, names="mlp"), cfg)}


# ---------------------------------------------------------------------------- 3, 4: threads and seeds

@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Tensors large enough (65536 entries) for torch to split a sum over threads."""
    root = tmp_path_factory.mktemp("wide")
    cfg = tied("llama", hidden_size=128, intermediate_size=512, num_hidden_layers=2)
    base = saved_state(cfg)
    return {n: save_checkpoint(root / n, s, cfg, dtype=torch.bfloat16) for n, s in
            {"base": base, "a": perturb(base, None, 0.01, seed=1), "b": perturb(base, None, 0.01, seed=2)}.items()}


def test_seeded_dare_ties_gives_the_same_bytes_on_any_thread_count(wide, tmp_path):
    from mergekit.merge_methods.api import merge_tensors

    recipe = tmp_path / "dare.yaml"
    recipe.write_text(f"inputs: {{base: {wide['base']}, a: {wide['a']}, b: {wide['b']}}}\nseed: 42\noperations:\n"
                      "  - merge: {method: dare_ties, base: base, models: {a: {weight: 0.5, density: 0.5}, "
                      "b: {weight: 0.5, density: 0.5}}}\n")
    outs = {}
    for n in (1, 2):
        res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / f"t{n}"), "--threads", str(n), "-q"])
        assert res.exit_code == 0, res.output
        assert json.loads((tmp_path / f"t{n}" / "surgery_manifest.json").read_text())["threads"] == n
        outs[n] = load(tmp_path / f"t{n}")
    assert all(raw_bytes(outs[1][k]) == raw_bytes(outs[2][k]) for k in outs[1])
    # the test has teeth: mergekit's kernel itself rounds its rescale sum differently on 1 and 2 threads
    name = "model.layers.0.mlp.up_proj.weight"
    ts = [load(wide[n])[name] for n in ("a", "b", "base")]
    params = {"weight": {"a": 0.5, "b": 0.5}, "density": {"a": 0.5, "b": 0.5}}
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        torch.manual_seed(7)
        results.append(merge_tensors(ts, "dare_ties", parameters=params, ids=["a", "b", "base"], base_index=2))
    assert not torch.equal(*results)


def test_thread_policy(monkeypatch):
    from surgery.core import threads

    monkeypatch.setenv("SURGERY_THREADS", "3")
    assert threads.default_threads() == 3 and surgery.set_threads() == 3 == torch.get_num_threads()
    monkeypatch.delenv("SURGERY_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.default_threads() is None  # the user's torch setting stands
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (6.7, 0.0, 0.0))
    assert threads.default_threads() == 1      # 8 cores, 6.7 busy: round(1.3)
    monkeypatch.setattr(os, "getloadavg", lambda: (20.0, 0.0, 0.0))
    assert threads.default_threads() == 1      # overloaded: still one
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert threads.default_threads() == 8
    monkeypatch.setenv("SURGERY_THREADS", "0")
    with pytest.raises(surgery.SurgeryError, match="SURGERY_THREADS: expected a number of threads >= 1, got '0'"):
        threads.default_threads()
    res = CliRunner().invoke(cli, ["diff", "a", "b", "--threads", "0"])
    assert res.exit_code == 2 and "--threads" in res.output


@pytest.mark.parametrize("command", ["run", "plan", "validate", "diff", "extract-lora", "adamergex", "eval", "demo"])
def test_every_computing_command_takes_threads(command):
    res = CliRunner().invoke(cli, [command, "--help"])
    assert res.exit_code == 0 and "--threads INTEGER RANGE" in res.output


def test_extract_lora_shows_progress(fam, tmp_path, monkeypatch):
    import surgery.cli.adapters

    from surgery.cli.options import show_progress

    # CliRunner's stderr is no terminal: the rule as on one
    monkeypatch.setattr(surgery.cli.adapters, "show_progress", lambda *silenced: not any(silenced))
    res = CliRunner().invoke(cli, ["extract-lora", str(fam["base"]), str(fam["tuned"]), "-o", str(tmp_path / "x"),
                                   "--rank", "2", "--threads", "1"])
    assert res.exit_code == 0, res.output
    n = len(load(fam["base"]))
    assert "extract-lora: 100%" in res.stderr and f"{n}/{n}" in res.stderr
    quiet = CliRunner().invoke(cli, ["extract-lora", str(fam["base"]), str(fam["tuned"]), "-o", str(tmp_path / "y"),
                                     "--rank", "2", "-q"])
    assert quiet.exit_code == 0 and "extract-lora:" not in quiet.stderr
    monkeypatch.setattr(surgery.cli.adapters, "show_progress", show_progress)  # the real rule: not a terminal
    piped = CliRunner().invoke(cli, ["extract-lora", str(fam["base"]), str(fam["tuned"]), "-o", str(tmp_path / "z"),
                                     "--rank", "2"])
    assert piped.exit_code == 0 and piped.stderr == ""


# ---------------------------------------------------------------------------- 5: adapters PEFT's auto classes load

def auto_peft_weights(folder) -> dict:
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def test_extracted_adapter_loads_with_auto_peft(fam, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(fam["base"].parent)  # the user names the base relatively
    res = surgery.extract_lora("base", "tuned", tmp_path / "x", rank=4)
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(fam["base"].resolve())
    monkeypatch.chdir(tmp_path)
    merged, base, tuned = auto_peft_weights(tmp_path / "x"), load(fam["base"]), load(fam["tuned"])
    row = next(r for r in res.rows if r.name == Q3)
    rel = float((merged[Q3] - tuned[Q3]).norm() / (tuned[Q3] - base[Q3]).norm())
    assert abs(rel - row.rel_error) < 1e-4
    card = (tmp_path / "x" / "README.md").read_text()
    assert "library_name: peft" in card and "AutoPeftModelForCausalLM" in card and "- rank: 4" in card


def test_adamergex_adapter_loads_with_auto_peft(fam, tmp_path, monkeypatch):
    """PEFT writes task_type null unless told; AdaMergeX takes it from the base's config."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(fam["base"].parent)
    model = AutoModelForCausalLM.from_pretrained("base", dtype=torch.float32)  # name_or_path 'base': relative
    for seed, name in enumerate(("task", "tgt", "src")):
        torch.manual_seed(seed)
        peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
        peft.save_pretrained(tmp_path / name)
        model = peft.unload()
    assert json.loads((tmp_path / "task" / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"
    res = CliRunner().invoke(cli, ["adamergex", *(str(tmp_path / n) for n in ("task", "tgt", "src")),
                                   "-o", str(tmp_path / "new"), "-t", "0.5"])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(fam["base"].resolve())
    monkeypatch.chdir(tmp_path)
    merged = auto_peft_weights(tmp_path / "new")
    recipe = {"inputs": {"base": str(fam["base"]), **{n: {"adapter": str(tmp_path / n), "base": "base"}
                                                      for n in ("task", "tgt", "src")}},
              "operations": [{"adamergex": {"task": "task", "target_ref": "tgt", "source_ref": "src", "t": 0.5}}]}
    surgery.run(recipe, tmp_path / "merged")
    assert torch.allclose(merged[Q3], load(tmp_path / "merged")[Q3], atol=1e-6)


def test_push_publishes_adapters_surgery_wrote(fam, tmp_path):
    surgery.extract_lora(fam["base"], fam["tuned"], tmp_path / "x", rank=2)
    dry = surgery.push(tmp_path / "x", "me/lora", dry_run=True)
    assert sorted(p for p, _ in dry.files if not p.startswith(".")) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "surgery_extract.json"]
    assert dry.commit_message == f"Upload LORA adapter (extract-lora) for {fam['base'].resolve()} (surgery)"
    # an adapter folder surgery did not write is still refused
    (tmp_path / "x" / "surgery_extract.json").unlink()
    with pytest.raises(surgery.SurgeryError, match="an adapter folder without surgery_extract.json or "
                                                   "surgery_adapter.json, so not one surgery wrote"):
        surgery.push(tmp_path / "x", "me/lora", dry_run=True)


def test_push_uploads_an_adapter_to_the_hub(fam, tmp_path, monkeypatch):
    from fakehub import FakeHub
    from huggingface_hub import constants

    surgery.extract_lora(fam["base"], fam["tuned"], tmp_path / "x", rank=2)
    with FakeHub(tokens={"hf_tok": "me"}) as hub:
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        res = CliRunner().invoke(cli, ["push", str(tmp_path / "x"), "me/lora", "--token", "hf_tok"])
        assert res.exit_code == 0, res.output
        remote = hub.files("me/lora", "main")
        local = {f.name: f.read_bytes() for f in (tmp_path / "x").iterdir()}
        assert ".surgery-output" in local and ".surgery-output" not in remote  # the local marker stays local
        assert {n: remote[n] for n in local if n != ".surgery-output"} == {n: b for n, b in local.items()
                                                                         if n != ".surgery-output"}
        assert hub.head("me/lora").summary.startswith("Upload LORA adapter (extract-lora)")


# ---------------------------------------------------------------------------- 6: diff accepts adapters

def test_diff_cli_accepts_an_adapter_folder(fam, tmp_path):
    surgery.extract_lora(fam["base"], fam["tuned"], tmp_path / "x", rank=32, modules=("attn_q",))  # exact
    res = CliRunner().invoke(cli, ["diff", str(fam["base"]), f"lora={tmp_path / 'x'}", "--json", "--threads", "1"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["experts"] == {"lora": str(tmp_path / "x")}
    stats = {t["name"]: t for t in data["tensors"] if t["expert"] == "lora"}
    base, tuned = load(fam["base"]), load(fam["tuned"])
    assert abs(stats[Q3]["delta_norm"] - float((tuned[Q3] - base[Q3]).norm())) < 1e-4
    assert stats["model.layers.3.self_attn.k_proj.weight"]["delta_norm"] == 0.0


def test_diff_cli_accepts_a_recipe_as_expert_or_base(fam, tmp_path):
    """A recipe is read as its result, computed in memory: the same statistics as its written output."""
    recipe = tmp_path / "swap.yaml"
    recipe.write_text(f"inputs: {{base: {fam['base']}, lang: {fam['lang']}}}\n"
                      "operations:\n  - layer_swap: {donor: lang, bottom: 3}\n")
    surgery.run(recipe, tmp_path / "out")

    def tensors(*args):
        res = CliRunner().invoke(cli, ["diff", *map(str, args), "--json", "--no-heads", "--no-neurons"])
        assert res.exit_code == 0, res.output
        return {t["name"]: t for t in json.loads(res.output)["tensors"]}

    from_recipe, written = tensors(fam["base"], f"x={recipe}"), tensors(fam["base"], f"x={tmp_path / 'out'}")
    assert from_recipe == written and from_recipe[Q3]["delta_norm"] == 0.0
    assert from_recipe["model.layers.1.mlp.up_proj.weight"]["delta_norm"] > 0
    assert tensors(recipe, f"x={tmp_path / 'out'}")[Q3]["delta_norm"] == 0.0  # a recipe as the base


# ---------------------------------------------------------------------------- 8: every neuron index recorded

def test_plan_json_and_manifest_record_every_neuron(fam, tmp_path):
    from surgery.analysis.diff import diff

    recipe = {"inputs": {"base": str(fam["base"]), "lang": str(fam["lang"])},
              "operations": [{"transplant_neurons": {"donor": "lang", "neurons": {"top": 20, "layers": "1-2"}}}]}
    res = surgery.run(recipe, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "surgery_manifest.json").read_text())
    (record,) = manifest["plan"]["selections"]
    top = diff(fam["base"], {"lang": fam["lang"]}).top_neurons("lang", 20)
    for layer in (1, 2):
        want = sorted(n.index for n in top if n.layer == layer)
        assert len(want) == 20 and sorted(record["neurons"][str(layer)]) == want
    assert set(record["neurons"]) == {"1", "2"} and record["operation"] == "#1 transplant_neurons"
    assert res.plan.to_dict()["selections"] == [record]
    assert "… (+12)" in res.plan.format()  # the human view stays short
    # the record is a neuron-set file: given back, it reproduces the transplant byte for byte
    (tmp_path / "set.json").write_text(json.dumps(record))
    again = {**recipe, "operations": [{"transplant_neurons": {"donor": "lang",
                                                              "neurons": {"file": str(tmp_path / "set.json")}}}]}
    surgery.run(again, tmp_path / "again")
    a, b = load(tmp_path / "out"), load(tmp_path / "again")
    assert all(raw_bytes(a[k]) == raw_bytes(b[k]) for k in a)


# ---------------------------------------------------------------------------- 9: plots

def test_heatmap_scales_each_column_and_shows_outer_tensors(fam, tmp_path):
    from surgery.analysis.diff import diff
    from surgery.analysis.plot import heatmap_data

    state = load(fam["tuned"])
    state["model.layers.0.input_layernorm.weight"] = state["model.layers.0.input_layernorm.weight"] * 50  # outlier
    odd = save_checkpoint(tmp_path / "odd", state, tied("llama"))
    result = diff(fam["base"], {"odd": odd})
    labels, cols, (values,), (colours,) = heatmap_data(result)
    assert labels[0] == "embeddings" and labels[-1] == "final norm" and "lm_head" not in labels  # tied
    e = result.experts["odd"]
    assert values[0, -1] == pytest.approx(e.outer["embed"].relative)
    assert values[1 + 3, cols.index("attn")] == pytest.approx(e.layer_groups[3]["attn"].relative)
    attn = colours[1:-1, cols.index("attn")]
    assert attn.max() == pytest.approx(1.0) and attn.min() > 0.5  # not flattened by the norm outlier
    norm = colours[1:-1, cols.index("norm")]
    assert norm[0] == pytest.approx(1.0) and norm[1:].max() < 0.1
    from surgery.analysis.plot import outer_positions

    assert outer_positions(result, list(range(8))) == {"embed": -2, "norm": 9}  # beside the layers, with a gap
    res = CliRunner().invoke(cli, ["diff", str(fam["base"]), f"odd={odd}", "--plot", str(tmp_path / "d.png"), "-q"])
    assert res.exit_code == 0, res.output
    for f in ("d.png", "d_layers.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("config, want", [
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "CAUSAL_LM"),
    ({"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True}, "SEQ_2_SEQ_LM"),
    ({"architectures": ["BertForSequenceClassification"]}, "SEQ_CLS"),
    ({"architectures": ["BertModel"]}, "FEATURE_EXTRACTION"),
    ({"model_type": "llama"}, "CAUSAL_LM"),          # no architectures: by model type
    ({"model_type": "vit"}, None),
    ({}, None)])
def test_task_type_from_the_base_config(config, want):
    from surgery.adapters.metadata import task_type

    assert task_type(config) == want
