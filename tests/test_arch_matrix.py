"""The architecture matrix: diff, layer swap, mergekit TIES parity, extract-lora and eval on a tiny random
checkpoint of every architecture mergekit 0.1.5 defines and transformers builds (tests/arch_models.py).

Each architecture's base and two fine-tunes are built once per session and shared by its checks.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from arch_models import ARCHS, LAYERS, arch_family
from helpers import load, raw_bytes

ARCH_NAMES = sorted(ARCHS)
DENSE = {"attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm"}
FUSED = {"attn_qkv", "attn_o", "mlp_up", "mlp_down", "norm"}
MOE = DENSE | {"mlp_router"}
# the kinds of every architecture's layer tensors (checked tensor by tensor against the names below)
LAYER_KINDS = {
    **{a: DENSE for a in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "cohere", "granite",
                          "olmo2", "stablelm", "exaone4")},
    "phi": DENSE - {"mlp_gate"}, "starcoder2": DENSE - {"mlp_gate"},
    "phi3": {"attn_qkv", "attn_o", "mlp_gate_up", "mlp_down", "norm"},
    "glm4": DENSE - {"mlp_gate", "mlp_up"} | {"mlp_gate_up"},
    "mixtral": MOE, "qwen3_moe": MOE,
    "gpt_neox": FUSED, "falcon": FUSED, "gpt2": FUSED, "gpt_bigcode": FUSED,
    "apertus": DENSE - {"mlp_gate"} | {"mlp_act"},
    "arcee": DENSE - {"mlp_gate"}, "cohere2": DENSE, "glm4_moe": MOE,
}
# what a name says about its kind, for the per-tensor check (the first match wins)
NAME_KINDS = [("act_fn.", "mlp_act"), ("q_norm", "norm"), ("k_norm", "norm"), ("qkv", "attn_qkv"),
              ("query_key_value", "attn_qkv"), ("c_attn", "attn_qkv"), ("q_proj", "attn_q"), ("k_proj", "attn_k"),
              ("v_proj", "attn_v"), ("o_proj", "attn_o"), ("attn.c_proj", "attn_o"), ("attention.dense", "attn_o"),
              ("self_attn.dense", "attn_o"), ("gate_up", "mlp_gate_up"), ("gate_proj", "mlp_gate"), ("w1", "mlp_gate"),
              ("up_proj", "mlp_up"), ("w3", "mlp_up"), ("fc1", "mlp_up"), ("c_fc", "mlp_up"), ("h_to_4h", "mlp_up"),
              ("down_proj", "mlp_down"), ("w2", "mlp_down"), ("fc2", "mlp_down"), ("mlp.c_proj", "mlp_down"),
              ("4h_to_h", "mlp_down"), (".gate.", "mlp_router"), ("norm", "norm"), ("ln_", "norm")]
NEURONS = {"falcon": 128, "qwen3_moe": 16, "glm4_moe": [64, 16]}  # MLP width where it is not intermediate_size (64)

def width(arch: str, layer: int) -> int:
    n = NEURONS.get(arch, 64)
    return n[layer] if isinstance(n, list) else n


TIES = """\
models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.4, density: 0.7}}
merge_method: ties
base_model: {base}
dtype: bfloat16
"""
MOE_XFAIL = pytest.mark.xfail(strict=True, reason="mergekit merges glm4_moe's experts fused; its fused layout is not in "
                                                  "surgery/_data/experts.json (mixtral, qwen2_moe, qwen3_moe are)")
TIES_SKIP = {"gpt_neox": "mergekit 0.1.5's gpt-neox.json requires attention.masked_bias, a buffer transformers "
                         "no longer saves, so mergekit cannot merge a GPT-NeoX checkpoint it writes",
             "falcon": "mergekit 0.1.5's falcon.json requires lm_head.weight, which Falcon checkpoints with tied "
                       "embeddings (the default) do not store"}


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """family(arch) -> {"base", "a", "b", "swap"}: paths, built on first use and shared by the session."""
    built = {}

    def get(arch):
        if arch not in built:
            root = tmp_path_factory.mktemp(arch)
            paths = arch_family(arch, root)
            import surgery

            paths["swap_recipe"] = {"inputs": {"a": str(paths["a"]), "b": str(paths["b"])}, "recipient": "a",
                                    "operations": [{"layer_swap": {"donor": "b", "layers": "1"}}]}
            surgery.run(paths["swap_recipe"], root / "swap")
            paths["swap"] = root / "swap"
            built[arch] = paths
        return built[arch]

    return get


def layout_of(path):
    from surgery.core.layout import Layout
    from surgery.io.checkpoint import Checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every architecture here is in the layout tables: no fallback warning
        return Layout.for_checkpoint(Checkpoint.open(path))


# ---------------------------------------------------------------------------- layout and diff

@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_every_tensor_gets_its_kind(arch, family):
    paths = family(arch)
    state, layout = load(paths["base"]), layout_of(paths["base"])
    infos = [layout.info(n) for n in state]
    assert {i.layer for i in infos if i.layer is not None} == set(range(LAYERS))
    assert {i.kind for i in infos if i.layer is not None} == LAYER_KINDS[arch]
    for i in infos:
        if i.layer is None:
            want = "final_norm" if ("norm" in i.name or "ln_f" in i.name) else \
                "lm_head" if ("lm_head" in i.name or "embed_out" in i.name) else "embed"
        else:
            want = next(k for part, k in NAME_KINDS if part in i.suffix)
        assert i.kind == want, (i.name, i.kind, want)
        if i.neuron_axis is not None and i.name.endswith("weight"):  # the axis has the MLP's width
            fused = 2 if i.kind == "mlp_gate_up" else 1
            assert state[i.name].shape[i.neuron_axis] == fused * width(arch, i.layer), i


def squared_delta(base: dict, expert: dict, names) -> float:
    return sum(float(((expert[n].double() - base[n].double()) ** 2).sum()) for n in names)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_diff_ranks_layers_neurons_and_heads(arch, family):
    import surgery

    paths = family(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tensor left out of the head or neuron scores
        res = surgery.diff(paths["base"], {"a": paths["a"], "b": paths["b"]})
    assert [layer for layer, _ in res.layer_ranking("a")] == [1, 0]  # a changed most in layer 1
    assert [layer for layer, _ in res.layer_ranking("b")] == [0, 1]
    assert res.heads_note == ""
    base, layout = load(paths["base"]), layout_of(paths["base"])
    infos = [layout.info(n) for n in base]
    neuron_names = [i.name for i in infos if i.layer is not None and i.neuron_axis is not None]
    head_names = [i.name for i in infos if i.layer is not None and i.kind in ("attn_q", "attn_k", "attn_v", "attn_qkv")
                  or (i.kind == "attn_o" and i.name.endswith("weight"))]
    for name in ("a", "b"):
        e, expert = res.experts[name], load(paths[name])
        for layer in range(LAYERS):
            # a score per neuron and per query head, whose squares add up to the squared delta of the tensors
            assert len(e.neuron_scores[layer]) == width(arch, layer)
            assert len(e.head_scores[layer]) == 4
            for scores, names in ((e.neuron_scores, neuron_names), (e.head_scores, head_names)):
                want = squared_delta(base, expert, [n for n in names if layout.info(n).layer == layer])
                assert math.isclose(float((scores[layer] ** 2).sum()), want, rel_tol=1e-6), (name, layer)
        groups = {g for gs in e.layer_groups.values() for g in gs}
        assert groups <= {"attn", "mlp", "norm"} and {"attn", "mlp"} <= groups


KV_HEADS = {"gpt_bigcode": 1, "gpt_neox": 4, "falcon": 2, "phi3": 2, "gpt2": 4}  # of 4 query heads, as configured


# where query head h / kv head g of a fused qkv tensor lies, as the transformers models split it
# (rows; columns for GPT-2's Conv1D): head_dim 8, 4 query heads
def qkv_rows(arch: str, what: str, index: int) -> slice:
    hd, nh, n_kv = 8, 4, KV_HEADS[arch]
    if arch in ("gpt_neox", "falcon"):  # per kv head: [q × nh/n_kv, k, v]
        g = nh // n_kv
        start = ((index // g) * (g + 2) + index % g) * hd if what == "q" else (index * (g + 2) + g) * hd
    else:  # [all q][all k][all v]
        start = index * hd if what == "q" else (nh + index) * hd
    return slice(start, start + hd)


@pytest.mark.parametrize("arch", sorted(KV_HEADS))
@pytest.mark.parametrize("what, index, changed", [("q", 2, [2]), ("k", 0, "group 0")])
def test_fused_qkv_heads_follow_the_model_split(arch, what, index, changed, family, tmp_path):
    """A delta in one query head's rows (or one kv head's key rows) of layer 0's fused qkv scores that head
    (or the query heads sharing that kv head) and no other."""
    from helpers import save_checkpoint
    from transformers import AutoConfig

    import surgery

    paths = family(arch)
    base, layout = load(paths["base"]), layout_of(paths["base"])
    name = next(n for n in base if layout.info(n).kind == "attn_qkv" and layout.info(n).layer == 0
                and n.endswith("weight"))
    changed_state = {k: v.clone() for k, v in base.items()}
    rows = qkv_rows(arch, what, index)
    if layout.transposed:
        changed_state[name][:, rows] += 1.0
    else:
        changed_state[name][rows] += 1.0
    cfg = AutoConfig.from_pretrained(paths["base"])
    expert = save_checkpoint(tmp_path / "e", changed_state, cfg, dtype=torch.bfloat16)
    scores = surgery.diff(paths["base"], {"e": expert}, neurons=False).experts["e"].head_scores[0]
    hit = changed if changed != "group 0" else list(range(4 // KV_HEADS[arch]))
    assert [h for h in range(4) if scores[h] > 0] == hit, scores


# ---------------------------------------------------------------------------- layer swap and eval

@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_layer_swap_is_the_donors_bytes_and_loads(arch, family):
    from transformers import AutoModelForCausalLM

    paths = family(arch)
    out, a, b = load(paths["swap"]), load(paths["a"]), load(paths["b"])
    layout = layout_of(paths["a"])
    assert sorted(out) == sorted(a)
    for n, t in out.items():
        src = b if layout.info(n).layer == 1 else a
        assert t.dtype == src[n].dtype and raw_bytes(t) == raw_bytes(src[n]), n
    model, info = AutoModelForCausalLM.from_pretrained(paths["swap"], dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    logits = model(torch.tensor([[256, 72, 105, 33]])).logits
    assert logits.shape == (1, 4, 259) and bool(torch.isfinite(logits).all())


EVAL_XFAIL = {  # the in-memory model takes checkpoint names as they are; transformers renames these when it loads
    "gpt_neox": "eval in memory: GPT-NeoX's embed_out.weight is lm_head.weight in transformers 5",
    "mixtral": "eval in memory: transformers 5 fuses the per-expert MoE weights when it loads them",
    "qwen3_moe": "eval in memory: transformers 5 fuses the per-expert MoE weights when it loads them",
    "glm4_moe": "eval in memory: transformers 5 fuses the per-expert MoE weights when it loads them"}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=[pytest.mark.xfail(strict=True, reason=EVAL_XFAIL[a])]
                                               if a in EVAL_XFAIL else []) for a in ARCH_NAMES])
def test_eval_in_memory_equals_the_written_swap(arch, family, tmp_path):
    import surgery

    paths = family(arch)
    text = tmp_path / "t.txt"
    text.write_text("Habari ya asubuhi, rafiki yangu.\nThe quick brown fox jumps over the lazy dog.\n")
    report = surgery.evaluate([paths["swap_recipe"], str(paths["swap"])], {"t": str(text)})
    (recipe_scores, written_scores) = [r.scores["t"] for r in report.rows]
    assert recipe_scores == written_scores
    assert 1.0 < written_scores["perplexity"] < 10_000 and math.isfinite(written_scores["bits_per_byte"])


# ---------------------------------------------------------------------------- mergekit TIES

def ties_params():
    out = []
    for arch in ARCH_NAMES:
        marks = [MOE_XFAIL] if arch == "glm4_moe" else []
        if arch in TIES_SKIP:
            marks = [pytest.mark.skip(reason=TIES_SKIP[arch])]
        out.append(pytest.param(arch, marks=marks))
    return out


@pytest.mark.parametrize("arch", ties_params())
def test_ties_config_is_bitwise_mergekit(arch, family, tmp_path):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import surgery

    paths = family(arch)
    config = tmp_path / "ties.yml"
    config.write_text(TIES.format(**{k: paths[k] for k in ("base", "a", "b")}))
    surgery.run(config, tmp_path / "ours")
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(config.read_text())), str(tmp_path / "mk"),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    mk, ours = load(tmp_path / "mk"), load(tmp_path / "ours")
    assert sorted(ours) == sorted(mk)
    for n in mk:
        assert ours[n].dtype == mk[n].dtype and raw_bytes(ours[n]) == raw_bytes(mk[n]), n


# ---------------------------------------------------------------------------- extract-lora

@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_extract_lora_loads_in_peft_and_rebuilds_the_fine_tune(arch, family, tmp_path):
    """At full rank the adapter is the whole delta: PEFT's merged weights are the fine-tune's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import surgery

    paths = family(arch)
    res = surgery.extract_lora(paths["base"], paths["a"], tmp_path / "lora", rank=64)
    assert {r.layer for r in res.rows} == set(range(LAYERS))
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "fan_in_fan_out is set to True but the target module is Linear"
        merged = PeftModel.from_pretrained(model, tmp_path / "lora").merge_and_unload().state_dict()
    tuned = load(paths["a"])
    for r in res.rows:
        assert r.name in merged, f"{r.name}: PEFT has no such weight to apply the adapter to"
        assert torch.allclose(merged[r.name], tuned[r.name].float(), atol=1e-4), r.name


def test_head_layout_from_config_and_tensor_sizes():
    from surgery.analysis.stream import head_vec
    from surgery.core.layout import Heads, Layout

    llama = Layout("model.layers.", "llama")
    assert llama.heads({"hidden_size": 32}) == (None, "the config has no num_attention_heads or n_head")
    assert llama.heads({"num_attention_heads": 5, "hidden_size": 32}) == \
        (None, "cannot derive head_dim from the config (heads 5, hidden size 32)")
    h, note = llama.heads({"text_config": {"num_attention_heads": 4, "hidden_size": 32}})
    assert (h, note) == (Heads(4, 8, kv_groups=False), "")
    assert Layout("transformer.h.", "falcon").heads({"n_head": 4, "n_embd": 64, "head_dim": 16})[0] == \
        Heads(4, 16, kv_groups=True)
    # kv heads from rows: K·d for k/v, (H + 2K)·d for fused qkv; None unless K is whole and divides H
    assert [h.kv_heads("attn_k", 16), h.kv_heads("attn_qkv", 48), h.kv_heads("attn_qkv", 96)] == [2, 1, 4]
    assert [h.kv_heads("attn_k", 24), h.kv_heads("attn_k", 12), h.kv_heads("attn_qkv", 40)] == [None, None, None]
    info = llama.info("model.layers.0.self_attn.k_proj.weight")
    with pytest.warns(UserWarning, match=r"^model\.layers\.0\.self_attn\.k_proj\.weight: 24 rows don't match the "
                                         r"config's attention head layout; left out of the head scores$"):
        assert head_vec(torch.ones(24), info, h) is None


def test_diff_cli_on_gpt_bigcode(family):
    """Issue 24, defect 2: `surgery diff` on GPT-BigCode (multi-query, fused c_attn) ended in a traceback."""
    import json

    from helpers import run_cli

    paths = family("gpt_bigcode")
    r = run_cli("diff", paths["base"], f"a={paths['a']}", "-q", "--json", "-k", "2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["layer_ranking"]["a"][0]["layer"] == 1
    assert {(h["layer"], h["expert"]) for h in out["heads"]["top"]} == {(0, "a"), (1, "a")}
    assert len(out["neurons"]["top"]) == 4 and "warning" not in r.stderr.lower()


def test_diff_of_moe_with_a_wider_shared_expert(family):
    """Qwen2-MoE's shared expert (48 wide) beside 16-wide routed experts: diff ended in a RuntimeError adding
    neuron vectors of both widths; the shared expert is an MLP of its own and gets no neuron axis."""
    import surgery

    paths = family("qwen2_moe")
    base, layout = load(paths["base"]), layout_of(paths["base"])
    shared = [n for n in base if ".shared_expert." in n]
    assert shared and all(layout.info(n).neuron_axis is None and layout.info(n).group == "mlp" for n in shared)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = surgery.diff(paths["base"], {"a": paths["a"]})
    e, expert = res.experts["a"], load(paths["a"])
    assert [layer for layer, _ in res.layer_ranking("a")] == [1, 0]
    for layer in range(LAYERS):
        routed = [n for n in base if layout.info(n).layer == layer and layout.info(n).neuron_axis is not None]
        assert routed and all(".experts." in n for n in routed)
        assert len(e.neuron_scores[layer]) == 16 and len(e.head_scores[layer]) == 4
        assert math.isclose(float((e.neuron_scores[layer] ** 2).sum()), squared_delta(base, expert, routed),
                            rel_tol=1e-6)
