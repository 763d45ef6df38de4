"""PEFT adapters as inputs, MAD-X stacking, AdaMergeX and LoRA extraction, checked against real peft."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import load, perturb, random_state, run_cli, save_checkpoint, tiny_config

from surgery.errors import SurgeryError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

Q0 = "model.layers.0.self_attn.q_proj.weight"
DOWN3 = "model.layers.3.mlp.down_proj.weight"


def _model(base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def make_adapter(base, out, config, seed):
    from peft import get_peft_model

    torch.manual_seed(seed)
    get_peft_model(_model(base), config).save_pretrained(out)
    return out


def peft_merged(base, *adapters) -> dict:
    """PEFT's own merge_and_unload() of one or more adapters, applied in order."""
    from peft import PeftModel

    names = [f"a{i}" for i in range(len(adapters))]
    pm = PeftModel.from_pretrained(_model(base), adapters[0], adapter_name=names[0])
    for n, p in zip(names[1:], adapters[1:]):
        pm.load_adapter(p, adapter_name=n)
    return {k: v.detach().clone() for k, v in pm.merge_and_unload(adapter_names=names).state_dict().items()}


@pytest.fixture(scope="module")
def ad(tmp_path_factory):
    """A tiny fp32 llama base and gpt2 base, with LoRA and (IA)³ adapters made by peft (random init)."""
    from peft import IA3Config, LoraConfig

    root = tmp_path_factory.mktemp("adapters")
    cfg = tiny_config("llama")
    base = save_checkpoint(root / "base", random_state(cfg, 0), cfg)
    p = {"root": root, "base": base}

    def lora(**kw):
        return LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kw)

    p["lora_full"] = make_adapter(base, root / "lora_full", lora(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], modules_to_save=["lm_head"],
        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3}), 1)
    p["lora_rs"] = make_adapter(base, root / "lora_rs", lora(r=8, lora_alpha=4, use_rslora=True,
                                                             target_modules=["k_proj", "o_proj", "up_proj"]), 2)
    for i, name in enumerate(["task", "tgt", "src"]):
        p[f"lora_{name}"] = make_adapter(base, root / f"lora_{name}", lora(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]), 10 + i)
    p["lora_lang2"] = make_adapter(base, root / "lora_lang2", lora(r=2, lora_alpha=2, target_modules=["q_proj", "up_proj"]), 20)
    for i, name in enumerate(["task", "tgt", "src"]):
        p[f"ia3_{name}"] = make_adapter(base, root / f"ia3_{name}", IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
            init_ia3_weights=False), 30 + i)
    # GPT-2: Conv1D weights (fan_in_fan_out) and biases
    g = tiny_config("gpt2")
    p["gbase"] = save_checkpoint(root / "gbase", random_state(g, 0), g)
    p["g_lora"] = make_adapter(p["gbase"], root / "g_lora", lora(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                                 fan_in_fan_out=True), 40)
    p["g_bias"] = make_adapter(p["gbase"], root / "g_bias", lora(r=2, lora_alpha=4, target_modules=["c_proj"],
                                                                 fan_in_fan_out=True, bias="all", lora_bias=True), 42)
    p["g_ia3"] = make_adapter(p["gbase"], root / "g_ia3", IA3Config(target_modules=["c_attn", "c_fc"],
                              feedforward_modules=["c_fc"], fan_in_fan_out=True, init_ia3_weights=False), 41)
    return p


def run_recipe(recipe: dict, out):
    from surgery.pipeline import run

    run(recipe, out, force=True)
    return load(out)


def raw(adapter) -> dict:
    return load_file(str(Path(adapter) / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------- adapters as inputs

@pytest.mark.parametrize("base,name", [("base", "lora_full"), ("base", "lora_rs"), ("base", "ia3_task"),
                                       ("gbase", "g_lora"), ("gbase", "g_ia3"), ("gbase", "g_bias")])
def test_adapter_input_equals_peft_merge_and_unload(ad, tmp_path, base, name):
    out = run_recipe({"inputs": {"base": str(ad[base]), "sw": {"adapter": str(ad[name]), "base": "base"}},
                      "recipient": "sw"}, tmp_path / "out")
    ref = peft_merged(ad[base], ad[name])
    basew = load(ad[base])
    changed = [k for k in ref if k in out and not torch.equal(ref[k], basew[k])]
    assert len(changed) >= 8  # the adapter really changes tensors
    for k in ref:
        if k in out:
            assert torch.equal(out[k], ref[k]), k  # bitwise


def test_adapter_reads_like_a_checkpoint(ad):
    from surgery.adapters.view import open_adapter
    from surgery.io.checkpoint import Checkpoint

    base = Checkpoint.open(ad["base"])
    view = open_adapter(ad["lora_full"], base, name="sw")
    ref = peft_merged(ad["base"], ad["lora_full"])
    assert view.keys() == base.keys() and view.meta == base.meta
    assert view.config == base.config and view.root == base.root and view.ref == str(ad["lora_full"])
    assert Q0 in view and torch.equal(view.get(Q0), ref[Q0])
    assert torch.equal(view.get("lm_head.weight"), ref["lm_head.weight"])  # modules_to_save
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.count_nonzero(view.delta(norm)) == 0
    assert torch.allclose(view.delta(Q0), ref[Q0] - base.get(Q0), atol=1e-6)


def test_adapter_in_bf16_base_is_peft_within_one_ulp(ad, tmp_path):
    from surgery.adapters.view import open_adapter

    cfg = tiny_config("llama")
    b16 = save_checkpoint(tmp_path / "b16", random_state(cfg, 0), cfg, dtype=torch.bfloat16)
    view = open_adapter(ad["lora_task"], b16)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(b16, dtype=torch.bfloat16)
    ref = PeftModel.from_pretrained(m, ad["lora_task"]).merge_and_unload().state_dict()
    ours = view.get(Q0)
    assert ours.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps * ref[Q0].float().abs().clamp_min(1e-30)
    assert ((ours.float() - ref[Q0].float()).abs() <= ulp * 1.0001).all()


def test_plan_shows_adapter_and_manifest_hashes_it(ad, tmp_path):
    from surgery.pipeline import run
    from surgery.pipeline import build_plan
    from surgery.loader import load_recipe

    recipe = {"inputs": {"base": str(ad["base"]), "sw": {"adapter": str(ad["lora_task"]), "base": "base"}},
              "operations": [{"layer_swap": {"donor": "sw", "bottom": 2}}]}
    text = build_plan(load_recipe(recipe)).format()
    assert "base + ΔW(sw)" in text and "sw:adapter" in text
    run(recipe, tmp_path / "o")
    manifest = json.loads((tmp_path / "o" / "surgery_manifest.json").read_text())
    assert list(manifest["inputs"]["sw:adapter"]["sha256"]) == ["adapter_model.safetensors"]
    out, ref, basew = load(tmp_path / "o"), peft_merged(ad["base"], ad["lora_task"]), load(ad["base"])
    assert torch.equal(out[Q0], ref[Q0])                                    # swapped layer: adapter
    q5 = "model.layers.5.self_attn.q_proj.weight"
    assert torch.equal(out[q5], basew[q5]) and not torch.equal(ref[q5], basew[q5])  # kept layer: base


def test_arithmetic_and_blend_on_adapters(ad, tmp_path):
    inputs = {"base": str(ad["base"]), "a": {"adapter": str(ad["lora_task"]), "base": "base"},
              "b": {"adapter": str(ad["lora_tgt"]), "base": "base"}}
    out = run_recipe({"inputs": inputs, "operations": [{"arithmetic": {"expr": "base + 0.5*(a - base) - (b - base)"}}]},
                     tmp_path / "x")
    w, da, db = load(ad["base"]), peft_merged(ad["base"], ad["lora_task"]), peft_merged(ad["base"], ad["lora_tgt"])
    for k in (Q0, DOWN3):
        want = w[k] + 0.5 * (da[k] - w[k]) - (db[k] - w[k])
        assert torch.allclose(out[k], want, atol=1e-6)
    out = run_recipe({"inputs": inputs, "operations": [{"blend": {"weights": {"a": 1, "b": 3}}}]}, tmp_path / "y")
    assert torch.allclose(out[Q0], 0.25 * da[Q0] + 0.75 * db[Q0], atol=1e-6)


# ---------------------------------------------------------------------------- MAD-X stacking

def test_madx_stack_equals_peft_merging_both(ad, tmp_path):
    def madx(lang):
        return run_recipe({"inputs": {"base": str(ad["base"]), "lang": {"adapter": str(ad[lang]), "base": "base"},
                                      "task": {"adapter": str(ad["lora_task"]), "base": "base"}},
                           "operations": [{"apply_adapters": {"adapters": ["lang", "task"]}}]}, tmp_path / lang)

    out = madx("lora_rs")
    ref = peft_merged(ad["base"], ad["lora_rs"], ad["lora_task"])
    for k in ref:
        assert torch.equal(out[k], ref[k]), k
    # swapping the language adapter: only what the language adapters touch changes
    other = madx("lora_lang2")
    ref2 = peft_merged(ad["base"], ad["lora_lang2"], ad["lora_task"])
    assert all(torch.equal(other[k], ref2[k]) for k in ref2)
    k_proj = "model.layers.2.self_attn.k_proj.weight"  # only lora_rs touches it
    assert not torch.equal(out[k_proj], other[k_proj]) and torch.equal(other[k_proj], load(ad["base"])[k_proj])


def test_apply_adapters_weights(ad, tmp_path):
    out = run_recipe({"inputs": {"base": str(ad["base"]), "t": {"adapter": str(ad["lora_task"]), "base": "base"}},
                      "operations": [{"apply_adapters": {"adapters": ["t"], "weights": [0.5]}}]}, tmp_path / "w")
    w, ref = load(ad["base"]), peft_merged(ad["base"], ad["lora_task"])
    assert torch.allclose(out[Q0] - w[Q0], 0.5 * (ref[Q0] - w[Q0]), atol=1e-6)


# ---------------------------------------------------------------------------- AdaMergeX

def _adamergex_inputs(ad, kind):
    return {"base": str(ad["base"]), **{n: {"adapter": str(ad[f"{kind}_{n}"]), "base": "base"}
                                        for n in ("task", "tgt", "src")}}


def _ops(t, mode="delta"):
    return [{"adamergex": {"task": "task", "target_ref": "tgt", "source_ref": "src", "t": t, "mode": mode}}]


def test_adamergex_lora_delta_is_exact_on_delta_w(ad, tmp_path):
    t = 0.7
    out = run_recipe({"inputs": _adamergex_inputs(ad, "lora"), "operations": _ops(t)}, tmp_path / "m")
    w = load(ad["base"])
    d = {n: {k: v - w[k] for k, v in peft_merged(ad["base"], ad[f"lora_{n}"]).items()} for n in ("task", "tgt", "src")}
    for k in (Q0, DOWN3, "model.layers.7.mlp.gate_proj.weight"):
        want = d["task"][k] + t * (d["tgt"][k] - d["src"][k])
        assert torch.allclose(out[k] - w[k], want, atol=1e-6), k
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], w["model.layers.0.mlp.up_proj.weight"])


def test_adamergex_lora_factors_follows_original(ad, tmp_path):
    t = 0.5
    out = run_recipe({"inputs": _adamergex_inputs(ad, "lora"), "operations": _ops(t, "factors")}, tmp_path / "f")
    w, r = load(ad["base"]), {n: raw(ad[f"lora_{n}"]) for n in ("task", "tgt", "src")}
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    a = r["task"][key.format("A")] + t * (r["tgt"][key.format("A")] - r["src"][key.format("A")])
    b = r["task"][key.format("B")] + t * (r["tgt"][key.format("B")] - r["src"][key.format("B")])
    assert torch.allclose(out[Q0], w[Q0] + (b @ a) * 2.0, atol=1e-6)  # scaling 8/4
    delta = run_recipe({"inputs": _adamergex_inputs(ad, "lora"), "operations": _ops(t)}, tmp_path / "d")
    assert not torch.allclose(out[Q0], delta[Q0], atol=1e-4)  # the two modes really differ


def test_adamergex_ia3_is_multiplicative(ad, tmp_path):
    t = 0.8
    out = run_recipe({"inputs": _adamergex_inputs(ad, "ia3"), "operations": _ops(t)}, tmp_path / "i")
    w, r = load(ad["base"]), {n: raw(ad[f"ia3_{n}"]) for n in ("task", "tgt", "src")}
    for k, lk in ((DOWN3, "base_model.model.model.layers.3.mlp.down_proj.ia3_l"),
                  ("model.layers.1.self_attn.v_proj.weight", "base_model.model.model.layers.1.self_attn.v_proj.ia3_l")):
        l_new = r["task"][lk] * (t * (r["tgt"][lk] / r["src"][lk] - 1.0) + 1.0)
        assert torch.equal(out[k], w[k] * l_new), k
    assert r["task"][lk].shape == (16, 1)  # attention: rows; feed-forward (down_proj): (1, 48) columns


@pytest.mark.parametrize("mode", ["delta", "factors"])
def test_adamergex_adapter_output_loads_in_peft(ad, tmp_path, mode):
    from surgery.adapters.adamergex import adamergex_adapter

    t = 0.6
    res = adamergex_adapter(ad["lora_task"], ad["lora_tgt"], ad["lora_src"], tmp_path / "ad", t=t, mode=mode)
    assert res.peft_type == "LORA"
    merged = peft_merged(ad["base"], tmp_path / "ad")
    recipe = run_recipe({"inputs": _adamergex_inputs(ad, "lora"), "operations": _ops(t, mode)}, tmp_path / "r")
    for k in (Q0, DOWN3):
        assert torch.allclose(merged[k], recipe[k], atol=1e-6), k
    if mode == "delta":
        assert set(res.ranks.values()) == {12}
    else:
        new, r = raw(tmp_path / "ad"), {n: raw(ad[f"lora_{n}"]) for n in ("task", "tgt", "src")}
        key = "base_model.model.model.layers.4.mlp.gate_proj.lora_A.weight"
        assert torch.equal(new[key], r["task"][key] + t * (r["tgt"][key] - r["src"][key]))


def test_adamergex_ia3_adapter_output(ad, tmp_path):
    from surgery.adapters.adamergex import adamergex_adapter

    t = 1.3
    adamergex_adapter(ad["ia3_task"], ad["ia3_tgt"], ad["ia3_src"], tmp_path / "ia", t=t)
    new, r = raw(tmp_path / "ia"), {n: raw(ad[f"ia3_{n}"]) for n in ("task", "tgt", "src")}
    for k in new:
        assert torch.equal(new[k], r["task"][k] * (t * (r["tgt"][k] / r["src"][k] - 1.0) + 1.0)), k
    merged, w = peft_merged(ad["base"], tmp_path / "ia"), load(ad["base"])
    lk = "base_model.model.model.layers.3.mlp.down_proj.ia3_l"
    assert torch.equal(merged[DOWN3], w[DOWN3] * new[lk])


def test_adamergex_cli(ad, tmp_path):
    from click.testing import CliRunner

    from surgery.cli import cli
    res = CliRunner().invoke(cli, ["adamergex", str(ad["lora_task"]), str(ad["lora_tgt"]), str(ad["lora_src"]),
                                   "-o", str(tmp_path / "c"), "-t", "0.5", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ranks"]["model.layers.0.self_attn.q_proj"] == 12
    res = CliRunner().invoke(cli, ["adamergex", str(ad["lora_task"]), str(ad["ia3_tgt"]), str(ad["lora_src"]),
                                   "-o", str(tmp_path / "e")])
    assert res.exit_code == 1 and "error: AdaMergeX needs adapters of one type" in res.output


# ---------------------------------------------------------------------------- extraction

@pytest.fixture(scope="module")
def tuned(ad):
    cfg = tiny_config("llama")
    state = perturb(random_state(cfg, 0), None, 0.02, seed=5)
    return save_checkpoint(ad["root"] / "tuned", state, cfg)


def _rel(a, b):
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("svd", ["full", "lowrank"])
def test_extract_lora_loads_in_peft_and_matches_reported_error(ad, tuned, tmp_path, svd):
    from surgery.pipeline import extract_lora

    res = extract_lora(ad["base"], tuned, tmp_path / "x", rank=6, svd=svd)
    assert len(res.rows) == 8 * 7 and all(r.rank == 6 for r in res.rows)
    assert any(s["name"].endswith("norm.weight") for s in res.skipped)  # norms changed but are not LoRA-able
    merged, w, tw = peft_merged(ad["base"], tmp_path / "x"), load(ad["base"]), load(tuned)
    for r in res.rows:
        true = tw[r.name] - w[r.name]
        assert abs(_rel(true, merged[r.name] - w[r.name]) - r.rel_error) < 1e-4, r.name
        assert 0.05 < r.rel_error < 1.0
    from peft import LoraConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LoraConfig.from_pretrained(tmp_path / "x").r == 6  # a config PEFT reads without complaint
    report = json.loads((tmp_path / "x" / "surgery_extract.json").read_text())
    assert report["layers"][0]["tensors"] == 7 and report["rank"] == 6


def test_extract_lora_full_rank_is_exact_and_energy_picks_ranks(ad, tuned, tmp_path):
    from surgery.pipeline import extract_lora

    res = extract_lora(ad["base"], tuned, tmp_path / "full", rank=64, modules=("attn_q",))
    assert {r.rank for r in res.rows} == {32} and max(r.rel_error for r in res.rows) < 1e-5
    res = extract_lora(ad["base"], tuned, tmp_path / "e", energy=0.6)
    assert all(r.energy >= 0.6 for r in res.rows) and len({r.rank for r in res.rows}) > 1
    merged, w, tw = peft_merged(ad["base"], tmp_path / "e"), load(ad["base"]), load(tuned)
    r = max(res.rows, key=lambda r: r.rank)
    assert abs(_rel(tw[r.name] - w[r.name], merged[r.name] - w[r.name]) - r.rel_error) < 1e-4


@pytest.mark.parametrize("svd", ["full", "lowrank"])
def test_extract_lora_from_an_adapter_recovers_it(ad, tmp_path, svd):
    """A rank-4 adapter's delta is rank 4: extracting at rank 4 reproduces it."""
    from surgery.pipeline import extract_lora

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs:\n  base: {ad['base']}\n  t: {{adapter: {ad['lora_task']}, base: base}}\nrecipient: t\n")
    res = extract_lora(ad["base"], recipe, tmp_path / "x", rank=4, svd=svd)
    assert len(res.rows) == 8 * 4 and max(r.rel_error for r in res.rows) < 1e-5
    merged, ref = peft_merged(ad["base"], tmp_path / "x"), peft_merged(ad["base"], ad["lora_task"])
    assert torch.allclose(merged[Q0], ref[Q0], atol=1e-5)


def test_extract_lora_cli(ad, tuned, tmp_path):
    from click.testing import CliRunner

    from surgery.cli import cli
    res = CliRunner().invoke(cli, ["extract-lora", str(ad["base"]), str(tuned), "-o", str(tmp_path / "c"), "--rank", "3"])
    assert res.exit_code == 0, res.output
    assert "mean rel err" in res.output and "not in the adapter" in res.output
    res = CliRunner().invoke(cli, ["extract-lora", str(ad["base"]), str(tuned), "-o", str(tmp_path / "d")])
    assert res.exit_code == 1 and res.output.strip() == "error: give --rank R or --energy F"
    res = CliRunner().invoke(cli, ["extract-lora", str(ad["base"]), str(tuned), "-o", str(tmp_path / "d"),
                                   "--energy", "1.5"])
    assert "error: energy must be in (0, 1], got 1.5" in res.output
    res = CliRunner().invoke(cli, ["extract-lora", str(ad["base"]), str(tuned), "-o", str(tmp_path / "d"),
                                   "--energy", "0.5", "--svd", "lowrank"])
    assert "error: svd 'lowrank' needs a rank (--rank)" in res.output


# ---------------------------------------------------------------------------- bad adapters

def _copy(src, dst, config=None, tensors=None):
    shutil.copytree(src, dst)
    if config:
        c = json.loads((dst / "adapter_config.json").read_text())
        c.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(c))
    if tensors:
        save_file(tensors(raw(dst)), str(dst / "adapter_model.safetensors"))
    return dst


def _plan_error(ad, adapter, base="base", match=None):
    from surgery.pipeline import build_plan
    from surgery.loader import load_recipe

    with pytest.raises(SurgeryError, match=match) as e:
        build_plan(load_recipe({"inputs": {"base": str(ad[base] if base in ad else base),
                                           "sw": {"adapter": str(adapter), "base": "base"}}}))
    return str(e.value)


def test_error_missing_base_module(ad, tmp_path):
    bad = _copy(ad["lora_task"], tmp_path / "bad", tensors=lambda t: {
        k.replace("layers.7.", "layers.9."): v for k, v in t.items()})
    msg = _plan_error(ad, bad, match="missing base module")
    assert "inputs.sw" in msg and "targets 'model.layers.9." in msg


def test_error_rank_mismatch(ad, tmp_path):
    bad = _copy(ad["lora_task"], tmp_path / "bad", config={"r": 8})
    msg = _plan_error(ad, bad, match="rank mismatch")
    assert "says r=8 but lora_A has shape [4, 48] and lora_B [32, 4]" in msg


def test_error_shape_mismatch(ad, tmp_path):
    cfg = tiny_config("llama", intermediate_size=64)
    other = save_checkpoint(tmp_path / "wide", random_state(cfg, 0), cfg)
    msg = _plan_error(ad, ad["lora_task"], base=str(other), match="shape mismatch")
    assert "B·A is [32, 48]" in msg and "[32, 64]" in msg
    msg = _plan_error(ad, ad["ia3_task"], base=str(other), match="shape mismatch")
    assert "does not scale a row or column" in msg


def test_error_unsupported_peft_types(ad, tmp_path):
    from peft import LoHaConfig, LoraConfig

    loha = make_adapter(ad["base"], tmp_path / "loha", LoHaConfig(r=2, target_modules=["q_proj"]), 0)
    assert "unsupported PEFT type 'LOHA' (supported: LORA, IA3)" in _plan_error(ad, loha)
    dora = make_adapter(ad["base"], tmp_path / "dora", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), 0)
    assert "DoRA adapters (use_dora=True) are not supported" in _plan_error(ad, dora)
    assert "no adapter_config.json; not a PEFT adapter directory" in _plan_error(ad, ad["base"])
    assert "adapter not found" in _plan_error(ad, tmp_path / "nope")


def test_recipe_errors_for_adapters(ad, tmp_path):
    from surgery.pipeline import build_plan
    from surgery.loader import load_recipe

    y = tmp_path / "r.yaml"
    y.write_text(f"inputs:\n  base: {ad['base']}\n  a: {{adapter: {ad['lora_task']}, base: base}}\n"
                 f"  b: {{adapter: {ad['lora_tgt']}, base: a}}\n")
    with pytest.raises(SurgeryError, match=r"r.yaml:4: inputs.b.base: the base of adapter 'b' must be a checkpoint"):
        load_recipe(y)
    with pytest.raises(SurgeryError, match=r"inputs.a: base 'bse' is not an input name, and as a path: checkpoint "
                                           r"not found: .*; did you mean input 'base'\?"):
        build_plan(load_recipe({"inputs": {"base": str(ad["base"]), "a": {"adapter": str(ad["lora_task"]),
                                                                          "base": "bse"}}}))
    inputs = {"base": str(ad["base"]), "i": {"adapter": str(ad["ia3_task"]), "base": "base"}}
    with pytest.raises(SurgeryError, match="input 'base' is a checkpoint, not an adapter"):
        build_plan(load_recipe({"inputs": inputs, "operations": [{"apply_adapters": {"adapters": ["base"]}}]}))
    with pytest.raises(SurgeryError, match=r"an \(IA\)³ adapter cannot be weighted"):
        build_plan(load_recipe({"inputs": inputs, "operations": [{"apply_adapters": {"adapters": ["i"], "weights": [2]}}]}))
    mixed = {**_adamergex_inputs(ad, "lora"), "tgt": {"adapter": str(ad["ia3_tgt"]), "base": "base"}}
    with pytest.raises(SurgeryError, match="AdaMergeX needs adapters of one type"):
        build_plan(load_recipe({"inputs": mixed, "operations": _ops(1.0)}))
    ranks = {**_adamergex_inputs(ad, "lora"), "tgt": {"adapter": str(ad["lora_lang2"]), "base": "base"}}
    with pytest.raises(SurgeryError, match="do not adapt it like the others"):
        build_plan(load_recipe({"inputs": ranks, "operations": _ops(1.0, "factors")}))


def test_cli_reports_bad_adapter_in_one_line(ad, tmp_path):
    bad = _copy(ad["lora_task"], tmp_path / "bad", config={"r": 2})
    y = tmp_path / "r.yaml"
    y.write_text(f"inputs:\n  base: {ad['base']}\n  sw: {{adapter: {bad}, base: base}}\nrecipient: sw\n")
    p = run_cli("validate", y, cwd=Path(__file__).parents[2])
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert p.stderr.startswith(f"error: {y}:3: inputs.sw: ") and "rank mismatch" in p.stderr


def test_adapter_of_a_bare_model_maps_to_causal_lm_names(ad, tmp_path):
    """An adapter trained on LlamaModel (keys without 'model.') applies to a LlamaForCausalLM checkpoint."""
    bare = _copy(ad["lora_task"], tmp_path / "bare", tensors=lambda t: {
        k.replace("base_model.model.model.", "base_model.model."): v for k, v in t.items()})
    from surgery.adapters.view import open_adapter

    view = open_adapter(bare, ad["base"])
    assert torch.equal(view.get(Q0), peft_merged(ad["base"], ad["lora_task"])[Q0])


def _chain(w, *terms):
    """w + (B·A)·s for each (adapter dir, module, factor), in order, as the lora op computes it."""
    out = w.float()
    for adapter, module, factor in terms:
        t = raw(adapter)
        cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
        scale = cfg["rank_pattern"].get(module, cfg["lora_alpha"]) / cfg["rank_pattern"].get(module, cfg["r"])
        a = t[f"base_model.model.{module}.lora_A.weight"].float()
        b = t[f"base_model.model.{module}.lora_B.weight"].float()
        out = out + (b @ a) * (scale * factor)
    return out


@pytest.mark.parametrize("recipe", ["madx_adapters.yaml", "adamergex_adapters.yaml"])
def test_example_recipes_run_on_the_demo(demo_dir, tmp_path, recipe):
    from surgery.pipeline import run

    ck = demo_dir / "checkpoints"
    (tmp_path / "recipes").mkdir()
    shutil.copy(Path(__file__).parents[2] / "recipes" / recipe, tmp_path / "recipes" / recipe)
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "checkpoints").symlink_to(ck)  # the recipes say ../demo/checkpoints
    out = load(run(tmp_path / "recipes" / recipe, tmp_path / "out").output)
    w = load(ck / "base")
    n = "model.layers.6.mlp.up_proj.weight"
    m = n[: -len(".weight")]
    if recipe.startswith("madx"):
        want = _chain(w[n], (ck / "lora-swahili", m, 1.0), (ck / "lora-math", m, 1.0))
    else:
        want = _chain(w[n], (ck / "lora-math", m, 1.0), (ck / "lora-swahili", m, 1.0), (ck / "lora-english", m, -1.0))
    assert torch.equal(out[n], want.to(torch.bfloat16))
    assert torch.equal(out["model.embed_tokens.weight"], w["model.embed_tokens.weight"])


def test_demo_adapters_carry_the_experts_updates(demo_dir):
    """The demo LoRAs are the experts' rank-4 updates: where an expert moved a lot, the LoRA is close."""
    report = json.loads((demo_dir / "checkpoints" / "lora-swahili" / "surgery_extract.json").read_text())
    by_layer = {row["layer"]: row["max_rel_error"] for row in report["layers"]}
    assert by_layer[0] < 0.02 and by_layer[7] < 0.02   # 30 % updates: only bf16 rounding is lost
    assert by_layer[3] > by_layer[0]                    # 2 % updates: bf16 rounding weighs more


def test_adapter_input_schema_errors(tmp_path):
    from surgery.errors import RecipeError
    from surgery.loader import load_recipe

    y = tmp_path / "r.yaml"
    y.write_text("inputs:\n  base: models/base\n  sw: {adapter: a/sw, bse: base}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(y)
    assert str(e.value) == f"{y}:3: inputs.sw.bse: unknown key 'bse'; did you mean 'base'? (valid keys: adapter, base)"
    y.write_text("inputs:\n  base: models/base\n  sw: {adapter: a/sw}\n")
    with pytest.raises(RecipeError, match=r"r.yaml:3: inputs.sw.base: missing required key 'base'"):
        load_recipe(y)


def test_per_layer_change_through_checkpoint_interface(ad):
    """What an analysis module does with (base, expert) works with (base, adapter)."""
    from surgery.adapters.view import open_adapter
    from surgery.io.checkpoint import Checkpoint
    from surgery.core.layout import Layout

    base = Checkpoint.open(ad["base"])
    for view in (open_adapter(ad["lora_lang2"], base), open_adapter(ad["ia3_task"], base)):
        layout = Layout.for_checkpoint(view)
        change: dict = {}
        for name in view.keys():
            info = layout.info(name)
            d = float((view.get(name).float() - base.get(name).float()).norm())
            change.setdefault((info.layer, info.kind), 0.0)
            change[(info.layer, info.kind)] += d
        touched = {k for k, v in change.items() if v > 0}
        want = {"attn_q", "mlp_up"} if view.peft_type == "LORA" else {"attn_k", "attn_v", "mlp_down"}
        assert touched == {(layer, kind) for layer in range(8) for kind in want}


def test_extract_lora_shrinks_an_adamergex_adapter(ad, tmp_path):
    """The exact AdaMergeX adapter has rank 12; extracting it at 12 is lossless, at 4 it reports the loss."""
    from surgery.adapters.adamergex import adamergex_adapter
    from surgery.pipeline import extract_lora

    adamergex_adapter(ad["lora_task"], ad["lora_tgt"], ad["lora_src"], tmp_path / "big", t=1.0)
    exact = extract_lora(ad["base"], tmp_path / "big", tmp_path / "r12", rank=12, modules=("attn_q",))
    assert max(r.rel_error for r in exact.rows) < 1e-5
    small = extract_lora(ad["base"], tmp_path / "big", tmp_path / "r4", rank=4, modules=("attn_q",))
    merged, w, big = peft_merged(ad["base"], tmp_path / "r4"), load(ad["base"]), peft_merged(ad["base"], tmp_path / "big")
    r = small.rows[0]
    assert r.rel_error > 0.1
    assert abs(_rel(big[r.name] - w[r.name], merged[r.name] - w[r.name]) - r.rel_error) < 1e-4


def test_adapter_recipient_with_stack_follows_source_layers(ad, tmp_path):
    """stack repeats source layers 6-7 as output layers 8-9: they get the adapter's layer-6/7 ΔW."""
    out = run_recipe({"inputs": {"base": str(ad["base"]), "sw": {"adapter": str(ad["lora_task"]), "base": "base"}},
                      "recipient": "sw", "stack": [{"layers": "0-7"}, {"layers": "6-7"}]}, tmp_path / "s")
    ref = peft_merged(ad["base"], ad["lora_task"])
    for out_layer, src in ((8, 6), (9, 7), (3, 3)):
        n = f"model.layers.{out_layer}.self_attn.q_proj.weight"
        assert torch.equal(out[n], ref[f"model.layers.{src}.self_attn.q_proj.weight"]), n
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 10
