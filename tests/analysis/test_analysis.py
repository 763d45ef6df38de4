"""surgery.analysis.diff: statistics, rankings and overlap on checkpoints whose deltas are built on purpose."""

import json
import math

import pytest
import torch
from analysis_kit import INTER, NEURONS, OUTER, neuron_delta
from helpers import load, random_state, save_checkpoint, tiny_config

from surgery.analysis.diff import diff
from surgery.errors import SurgeryError

@pytest.fixture(scope="module")
def result(ckpts):
    return diff(ckpts["base"], {n: ckpts[n] for n in ("lang", "neu", "neu2")})


def _t(path, name):
    return load(path)[name].float()


# ---------------------------------------------------------------------------- statistics

def test_layers_changed_are_ranked_first_and_others_are_zero(result):
    ranking = result.layer_ranking("lang")
    assert {i for i, _ in ranking[:4]} == set(OUTER)
    assert all(s > 0 for _, s in ranking[:4]) and all(s == 0 for _, s in ranking[4:])
    e = result.experts["lang"]
    for i in range(8):
        st = e.layers[i]
        if i in OUTER:
            assert st.frac_changed > 0.9 and st.cosine < 1
        else:
            assert st.delta_norm == 0 and st.frac_changed == 0 and st.max_abs == 0
            assert st.cosine == pytest.approx(1.0, abs=1e-6)
    assert e.outer["embed"].delta_norm == 0 and e.outer["lm_head"].delta_norm == 0


def test_tensor_stats_equal_formulas(ckpts, tmp_path):
    name = "model.layers.6.mlp.up_proj.weight"
    b, x = _t(ckpts["base"], name), _t(ckpts["lang"], name)
    d = x - b
    tol = 0.03
    r = diff(ckpts["base"], {"lang": ckpts["lang"]}, tol=tol, neurons=False, heads=False)
    (st,) = [t for t in r.experts["lang"].tensors if t.name == name]
    assert st.numel == d.numel()
    assert st.delta_norm == pytest.approx(float(d.norm()), rel=1e-5)
    assert st.base_norm == pytest.approx(float(b.norm()), rel=1e-5)
    assert st.relative == pytest.approx(float(d.norm() / b.norm()), rel=1e-5)
    assert st.mean_abs == pytest.approx(float(d.abs().mean()), rel=1e-5)
    assert st.max_abs == float(d.abs().max())
    cosine = float(torch.nn.functional.cosine_similarity(x.flatten(), b.flatten(), 0))
    assert st.cosine == pytest.approx(cosine, abs=1e-6)
    assert st.frac_changed == float((d.abs() > tol).float().mean())
    assert 0 < st.frac_changed < 1
    assert (st.layer, st.kind, st.group) == (6, "mlp_up", "mlp")


def test_layer_and_group_aggregates_pool_their_tensors(ckpts, result):
    base, lang = load(ckpts["base"]), load(ckpts["lang"])
    names = [n for n in base if ".layers.1." in n]
    d = torch.cat([(lang[n].float() - base[n].float()).flatten() for n in names])
    w = torch.cat([base[n].float().flatten() for n in names])
    st = result.experts["lang"].layers[1]
    assert st.numel == d.numel()
    assert st.delta_norm == pytest.approx(float(d.norm()), rel=1e-5)
    assert st.relative == pytest.approx(float(d.norm() / w.norm()), rel=1e-5)
    assert st.max_abs == float(d.abs().max())
    mlp = [n for n in names if ".mlp." in n]
    dm = torch.cat([(lang[n].float() - base[n].float()).flatten() for n in mlp])
    assert result.experts["lang"].layer_groups[1]["mlp"].delta_norm == pytest.approx(float(dm.norm()), rel=1e-5)
    assert set(result.experts["lang"].layer_groups[1]) == {"attn", "mlp", "norm"}


def test_pair_cosine_and_sign_agreement_by_hand(ckpts, result):
    base, a, b = load(ckpts["base"]), load(ckpts["neu"]), load(ckpts["neu2"])
    names = [n for n in base if ".layers.4." in n]
    da = torch.cat([(a[n].float() - base[n].float()).flatten() for n in names]).double()
    db = torch.cat([(b[n].float() - base[n].float()).flatten() for n in names]).double()
    p = result.pairs[("neu", "neu2")]["layers"][4]
    assert p.cosine == pytest.approx(float(da @ db / (da.norm() * db.norm())), abs=1e-5)
    both = (da != 0) & (db != 0)
    assert p.both_changed == int(both.sum()) > 0
    assert p.sign_agreement == pytest.approx(float(((da * db) > 0).sum() / both.sum()))
    # layers where one expert did not change: no entry changed in both
    assert result.pairs[("lang", "neu")]["layers"][4].both_changed == 0
    assert result.pairs[("lang", "neu")]["layers"][4].sign_agreement is None
    assert result.pairs[("lang", "neu")]["layers"][0].cosine is None  # neu did not change layer 0: undefined


# ---------------------------------------------------------------------------- neurons and heads

def test_top_neurons_are_exactly_the_changed_ones(result):
    glob = result.top_neurons("neu", 3, per_layer=False)
    assert {(n.layer, n.index) for n in glob} == {(4, j) for j in NEURONS}
    per = result.top_neurons("neu", 5)  # unchanged neurons (score 0) are never chosen
    assert {(n.layer, n.index) for n in per} == {(4, j) for j in NEURONS}
    assert [n.index for n in per] == NEURONS  # scales 0.05 > 0.04 > 0.03
    assert result.top_neurons("neu", 1, per_layer=False)[0].index == 3
    assert len(result.top_neurons("neu", 0.05)) == 3  # round(0.05*64) = 3 in layer 4, none elsewhere
    assert result.top_neurons("lang", 0.1, layers=[0])[0].layer == 0
    assert len(result.top_neurons("lang", 0.1, layers=[0])) == round(0.1 * INTER)


def test_neuron_score_formula(ckpts, result):
    base, neu = load(ckpts["base"]), load(ckpts["neu"])
    p = "model.layers.4.mlp."
    d = {k: neu[p + k + ".weight"].float() - base[p + k + ".weight"].float()
         for k in ("gate_proj", "up_proj", "down_proj")}
    j = 17
    want = math.sqrt(float((d["gate_proj"][j] ** 2).sum() + (d["up_proj"][j] ** 2).sum()
                           + (d["down_proj"][:, j] ** 2).sum()))
    assert result.experts["neu"].neuron_scores[4][j] == pytest.approx(want, rel=1e-5)
    assert result.experts["neu"].neuron_scores[4].shape == (INTER,)
    # neuron scores add up to the MLP group's change
    assert math.sqrt((result.experts["neu"].neuron_scores[4] ** 2).sum()) == \
        pytest.approx(result.experts["neu"].layer_groups[4]["mlp"].delta_norm, rel=1e-5)


def test_overlap_equals_hand_computed_values(result):
    rows = result.neuron_overlap("neu", "neu2", 3)
    by_layer = {r.layer: r for r in rows}
    r4 = by_layer[4]  # A = {3,17,40}, B = top-3 of {17:.2, 40:.2, 50:.1, 60:.01} = {17,40,50}
    assert (r4.k, r4.size_a, r4.size_b, r4.intersection, r4.union) == (3, 3, 3, 2, 4)
    assert r4.jaccard == 0.5 and r4.overlap == pytest.approx(2 / 3)
    r0 = by_layer[0]
    assert (r0.intersection, r0.union, r0.jaccard, r0.overlap) == (0, 0, None, 0.0)
    pooled = by_layer[None]
    assert (pooled.k, pooled.intersection, pooled.union) == (24, 2, 4)
    assert pooled.jaccard == 0.5 and pooled.overlap == pytest.approx(2 / 24)
    glob = result.neuron_overlap("neu", "neu2", 3, per_layer=False)
    assert len(glob) == 1 and (glob[0].k, glob[0].intersection, glob[0].union) == (3, 2, 4)


def test_gqa_head_scores(tmp_path):
    cfg = tiny_config("llama", intermediate_size=INTER)  # 4 heads, 2 kv heads, head_dim 8
    base = random_state(cfg, seed=0)
    ex = {k: v.clone() for k, v in base.items()}
    ex["model.layers.3.self_attn.q_proj.weight"][16:24] += 0.1   # query head 2
    ex["model.layers.5.self_attn.k_proj.weight"][0:8] += 0.1     # kv head 0 = query heads 0 and 1
    ex["model.layers.5.self_attn.o_proj.weight"][:, 24:32] += 0.1  # query head 3
    b = save_checkpoint(tmp_path / "b", base, cfg)
    e = save_checkpoint(tmp_path / "e", ex, cfg)
    r = diff(b, {"e": e})
    h = r.experts["e"].head_scores
    assert [x.index for x in r.top_heads("e", 4, layers=[3])] == [2]
    assert h[3][2] == pytest.approx(math.sqrt(8 * 32 * 0.01), rel=1e-4)
    k_sq = 8 * 32 * 0.01
    assert h[5][0] == pytest.approx(math.sqrt(k_sq / 2), rel=1e-4) and h[5][1] == pytest.approx(h[5][0])
    assert h[5][3] == pytest.approx(math.sqrt(k_sq), rel=1e-4) and h[5][2] == 0
    assert (h[5] ** 2).sum() == pytest.approx(r.experts["e"].layer_groups[5]["attn"].delta_norm ** 2, rel=1e-4)


def test_fused_gate_up_and_qkv(tmp_path):
    cfg = tiny_config("phi3", intermediate_size=INTER)  # gate_up_proj [2I, H], qkv_proj
    base = random_state(cfg, seed=0)
    ex = neuron_delta(base, 2, NEURONS, [0.05, 0.05, 0.05])
    ex["model.layers.6.self_attn.qkv_proj.weight"][8:16] += 0.1  # q rows of head 1
    b = save_checkpoint(tmp_path / "b", base, cfg)
    e = save_checkpoint(tmp_path / "e", ex, cfg)
    r = diff(b, {"e": e})
    assert {(n.layer, n.index) for n in r.top_neurons("e", 10)} == {(2, j) for j in NEURONS}
    assert r.experts["e"].neuron_scores[2].shape == (INTER,)
    assert [(x.layer, x.index) for x in r.top_heads("e", 10)] == [(6, 1)]


# ---------------------------------------------------------------------------- outputs

def test_json_schema_and_csv(result, tmp_path):
    d = json.loads(result.to_json(k=3))
    assert d["schema"] == "surgery.diff/1"
    assert set(d) == {"schema", "base", "experts", "num_layers", "tol", "totals", "layers", "outer", "tensors",
                      "layer_ranking", "pairs", "neurons", "heads", "overlap"}
    assert d["num_layers"] == 8 and list(d["experts"]) == ["lang", "neu", "neu2"]
    assert {r["layer"] for r in d["layer_ranking"]["lang"][:4]} == set(OUTER)
    top = [(r["layer"], r["index"]) for r in d["neurons"]["top"] if r["expert"] == "neu"]
    assert sorted(top) == [(4, j) for j in NEURONS]
    row = next(r for r in d["overlap"] if r["a"] == "neu" and r["b"] == "neu2" and r["layer"] == 4)
    assert row["intersection"] == 2 and row["jaccard"] == 0.5
    assert {"expert", "layer", "group", "relative", "cosine", "frac_changed"} <= set(d["layers"][0])
    text = result.to_csv(tmp_path / "s.csv")
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == ("expert,level,layer,group,kind,name,numel,delta_norm,base_norm,relative,mean_abs,max_abs,"
                        "cosine,frac_changed")
    assert text.count("\nlang,tensor,") == len(result.experts["lang"].tensors)
    assert "\nlang,layer,4,all,,,"  in text


def test_plots_are_pngs(result, tmp_path):
    for f in (result.plot_heatmap(tmp_path / "h.png"), result.plot_layers(tmp_path / "l.png")):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 10_000


def test_table_shows_ranks_and_overlap(result):
    text = result.format_table(k=3)
    assert "expert lang" in text and "task vectors neu vs neu2" in text
    assert "top 3 MLP neurons (layer:index score): 4:3" in text


# ---------------------------------------------------------------------------- errors

def test_bad_inputs(ckpts, tmp_path, result):
    cfg = tiny_config("llama", intermediate_size=32)
    other = save_checkpoint(tmp_path / "other", random_state(cfg), cfg)
    with pytest.raises(SurgeryError, match=r"expert 'x': tensor 'model.layers.0.mlp.down_proj.weight' "
                                           r"has shape \[32, 32\], the base has \[32, 64\]"):
        diff(ckpts["base"], {"x": other})
    st = {k: v for k, v in random_state(tiny_config("llama", intermediate_size=INTER)).items() if "lm_head" not in k}
    short = save_checkpoint(tmp_path / "short", st, cfg)
    with pytest.raises(SurgeryError, match=r"expert 'y' .* lacks 1 tensor\(s\) of the base, e.g. 'lm_head.weight'"):
        diff(ckpts["base"], {"y": short})
    with pytest.raises(SurgeryError, match="at least one expert"):
        diff(ckpts["base"], {})
    with pytest.raises(SurgeryError, match="tolerance must be >= 0"):
        diff(ckpts["base"], {"a": ckpts["lang"]}, tol=-1)
    with pytest.raises(SurgeryError, match="unknown expert 'nope' \\(experts: lang, neu, neu2\\)"):
        result.layer_ranking("nope")
    with pytest.raises(SurgeryError, match="unknown metric 'size'"):
        result.layer_ranking("lang", "size")
    with pytest.raises(SurgeryError, match="top-k fraction must be between 0 and 1, got 1.5"):
        result.top_neurons("neu", 1.5)
    with pytest.raises(SurgeryError, match="top-k must be at least 1"):
        result.top_neurons("neu", 0)


def test_gpt2_transposed_conv1d_neurons_and_fused_heads(tmp_path):
    cfg = tiny_config("gpt2")  # Conv1D weights are [in, out]; c_attn fuses q, k, v along its columns
    base = random_state(cfg, seed=0)
    ex = {k: v.clone() for k, v in base.items()}
    for j in NEURONS[:2]:
        ex["transformer.h.3.mlp.c_fc.weight"][:, j] += 0.05     # neuron j: column j of c_fc
        ex["transformer.h.3.mlp.c_proj.weight"][j, :] += 0.05   # and row j of c_proj
    ex["transformer.h.5.attn.c_attn.weight"][:, 40:48] += 0.05  # k columns of head 1 (q is 0-31)
    b = save_checkpoint(tmp_path / "b", base, cfg)
    e = save_checkpoint(tmp_path / "e", ex, cfg)
    r = diff(b, {"e": e})
    assert {(n.layer, n.index) for n in r.top_neurons("e", 5)} == {(3, j) for j in NEURONS[:2]}
    assert [(x.layer, x.index) for x in r.top_heads("e", 5)] == [(5, 1)]


def test_sharded_expert_gives_the_same_numbers(ckpts, tmp_path):
    cfg = tiny_config("llama", intermediate_size=INTER)
    state = load(ckpts["lang"])
    names = list(state)
    sharded = save_checkpoint(tmp_path / "sh", state, cfg, dtype=torch.bfloat16,
                              shard_names=[names[:7], names[7:30], names[30:]])
    a = diff(ckpts["base"], {"x": ckpts["lang"]})
    b = diff(ckpts["base"], [sharded])
    assert list(b.experts) == ["sh"]
    assert a.experts["x"].layers == b.experts["sh"].layers and a.experts["x"].total == b.experts["sh"].total


def test_mixed_dtypes_compare_values(ckpts, tmp_path):
    """A float32 copy of the bf16 base has no delta; a float16 copy differs only by rounding."""
    cfg = tiny_config("llama", intermediate_size=INTER)
    state = load(ckpts["base"])
    f32 = save_checkpoint(tmp_path / "f32", state, cfg, dtype=torch.float32)
    r = diff(ckpts["base"], {"f32": f32}, neurons=False, heads=False)
    assert r.experts["f32"].total.delta_norm == 0 and r.experts["f32"].total.frac_changed == 0
