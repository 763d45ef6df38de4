"""surgery probe: LAPE neurons, layer-wise probes and alignment on constructed cases with known answers."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import run_cli
from probe_helpers import A_NEURON, B_NEURON, mirrored_texts, wired_model
from safetensors.torch import load_file

import surgery
from surgery.probing.lape import LapeSettings, entropy, select
from surgery.probing.layerwise import alignment, probe_accuracy


def invoke(*args):
    r = run_cli(*args)
    return SimpleNamespace(exit_code=r.returncode, output=r.stdout + r.stderr, stdout=r.stdout)


@pytest.fixture(scope="module")
def wired(tmp_path_factory):
    root = tmp_path_factory.mktemp("wired")
    a, b = mirrored_texts(40)
    (root / "a.txt").write_text("\n".join(a) + "\n")
    (root / "b.txt").write_text("\n".join(b) + "\n")
    (root / "ab.jsonl").write_text("".join(json.dumps({"a": x, "b": y}) + "\n" for x, y in zip(a, b)))
    return {"model": wired_model(root / "wired"), "model0": wired_model(root / "noattn0", zero_attention0=True),
            "root": root, "a": a, "b": b}


def test_lape_finds_the_wired_neurons(wired):
    r = surgery.probe(wired["model"], texts={"a": wired["a"], "b": wired["b"]}, progress=False)
    lape = r.models["wired"].lape
    assert [(n.layer, n.index) for n in r.neurons("a")] == [A_NEURON]
    assert [(n.layer, n.index) for n in r.neurons("b")] == [B_NEURON]
    assert lape.probs[A_NEURON].tolist() == [1.0, 0.0] and lape.probs[B_NEURON].tolist() == [0.0, 1.0]
    others = np.ones(lape.probs.shape[:2], bool)
    others[A_NEURON] = others[B_NEURON] = False
    # every other neuron sees the same activations on a text and its mirror
    assert np.array_equal(lape.probs[others][:, 0], lape.probs[others][:, 1])
    assert lape.tokens == {"a": sum(len(t.split()) for t in wired["a"])} | {"b": lape.tokens["b"]}
    assert lape.counts() == {"a": [0, 1, 0, 0], "b": [0, 0, 1, 0]}


def test_activation_probabilities_equal_a_hand_computation(wired):
    """Layer 0 without attention output: its MLP input is the normed embedding, so p is computable by hand."""
    path = wired["model0"]
    sd = load_file(str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    emb, w_norm = sd["model.embed_tokens.weight"], sd["model.layers.0.post_attention_layernorm.weight"]
    gate = sd["model.layers.0.mlp.gate_proj.weight"]
    x = emb / torch.sqrt(emb.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"]) * w_norm
    fires = (x @ gate.T > 0).double()                          # (vocab, neurons)
    want = []
    for texts, offset in ((wired["a"], 0), (wired["b"], 64)):
        ids = [int(w[1:]) + offset for t in texts for w in t.split()]
        want.append(fires[ids].mean(0).numpy())
    r = surgery.probe(path, texts={"a": wired["a"], "b": wired["b"]}, probing=False, progress=False)
    np.testing.assert_allclose(r.models["noattn0"].lape.probs[0], np.stack(want, 1), rtol=0, atol=1e-12)


def test_lape_selection_on_constructed_probabilities():
    probs = np.full((1, 100, 2), 0.1)
    probs[0, 90:] = [(0.9, 0.0), (0.0, 0.8), (0.9, 0.9), (0.05, 0.0)] + [(0.5, 0.5)] * 6
    # sorted values: 0, 0, 0, 0.05, 0.1 x180, 0.5 x12, 0.8, 0.9 x3 -> the 190th (0.95 quantile) is 0.5;
    # only neurons 90, 91, 92 exceed it; entropies 0, 0, log 2.
    one = select(probs, ["a", "b"], [0], {"a": 1, "b": 1}, LapeSettings(top_rate=0.02))
    assert one.filter_value == one.bar_value == 0.5
    assert {k: [n.index for n in v] for k, v in one.neurons.items()} == {"a": [90], "b": [91]}
    three = select(probs, ["a", "b"], [0], {"a": 1, "b": 1}, LapeSettings(top_rate=0.05))
    assert {k: [n.index for n in v] for k, v in three.neurons.items()} == {"a": [90, 92], "b": [91, 92]}
    assert three.neurons["b"][0].score == 0.8
    assert math.isinf(three.entropy[0, 93]) and three.entropy[0, 92] == pytest.approx(math.log(2))
    assert entropy(np.array([[0.2, 0.2, 0.0, 0.4]])).item() == pytest.approx(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)))
    with pytest.raises(surgery.SurgeryError, match="between 0 and 1"):
        LapeSettings(top_rate=1.5)


def test_probe_accuracy_is_one_at_the_separating_layer_and_chance_elsewhere():
    rng = np.random.default_rng(0)
    labels = np.array(["x", "y"] * 60)
    layers = [rng.normal(size=(120, 8)) for _ in range(4)]
    layers[2][:, 0] += np.where(labels == "x", 4.0, -4.0)
    acc = [probe_accuracy(X, labels)[0] for X in layers]
    assert acc[2] == 1.0
    assert all(0.3 < acc[i] < 0.7 for i in (0, 1, 3)), acc


def test_alignment_on_constructed_vectors():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(60, 16))
    near = alignment(src, src + 0.01 * rng.normal(size=src.shape), block=7)
    assert near.retrieval == near.retrieval_back == 1.0 and near.pair_cosine > 0.999
    tgt = rng.normal(size=src.shape)
    far = alignment(src, tgt, block=7)
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    sims = unit(src) @ unit(tgt).T
    assert far.pair_cosine == pytest.approx(np.diag(sims).mean(), abs=1e-12)
    assert far.random_cosine == pytest.approx(sims[~np.eye(60, dtype=bool)].mean(), abs=1e-12)
    centred = unit(src - src.mean(0)) @ unit(tgt - tgt.mean(0)).T
    assert far.centered_cosine == pytest.approx(np.diag(centred).mean(), abs=1e-12)
    assert far.retrieval == (centred.argmax(1) == np.arange(60)).mean()
    assert far.retrieval_back == (centred.argmax(0) == np.arange(60)).mean()
    assert far.retrieval < 0.2
    # a shared offset dominates raw cosines; centring removes it
    offset = alignment(src + 50, src + 0.01 * rng.normal(size=src.shape) - 50)
    assert offset.pair_cosine < -0.99 and offset.retrieval == 1.0 and offset.centered_cosine > 0.999


def test_cli_writes_json_csv_plot_and_neuron_sets_that_recipes_read(wired, tmp_path):
    root = wired["root"]
    out = invoke("probe", wired["model"], "--text", f"a={root / 'a.txt'}", "--text", f"b={root / 'b.txt'}",
                 "--parallel", root / "ab.jsonl", "--json", "--csv", tmp_path / "p.csv", "--plot", tmp_path / "p.png",
                 "--save-neurons", tmp_path / "lape", "--batch-size", 7)
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)
    m = res["models"]["wired"]
    assert res["format"] == "surgery.probe/1" and m["layers"] == [0, 1, 2, 3]
    assert m["probing"]["accuracy"] == [1.0] * 4 and m["probing"]["chance"] == 0.5
    # a text and its mirror differ only in dimension 0 -> each one's nearest neighbour is its translation
    assert m["alignment"]["a-b"]["retrieval"] == [1.0] * 4 == m["alignment"]["a-b"]["retrieval_back"]
    assert m["alignment"]["a-b"]["centered_cosine"] == pytest.approx([1.0] * 4, abs=1e-6)
    assert m["lape"]["neurons"] == {"a": {"1": [5]}, "b": {"2": [7]}}
    assert surgery.load_neuron_set(tmp_path / "lape" / "a.json") == {1: [(5, 1.0)]}
    assert (tmp_path / "p.png").stat().st_size > 10_000
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "model,analysis,key,layer,metric,value" and "wired,lape,b,2,neurons,1" in rows
    assert len(rows) == 1 + 4 * 2 + 4 * 5 + 2 * 4

    recipe = tmp_path / "mask.yaml"
    recipe.write_text(f"inputs:\n  m: {wired['model']}\noperations:\n"
                      f"  - reset_neurons: {{to: zero, neurons: {{file: {tmp_path / 'lape' / 'a.json'}}}}}\n")
    masked = load_file(str(surgery.run(surgery.load_recipe(recipe), tmp_path / "masked").output / "model.safetensors"))
    layer, j = A_NEURON
    assert not masked[f"model.layers.{layer}.mlp.gate_proj.weight"][j].any()
    r = surgery.probe(tmp_path / "masked", texts={"a": wired["a"], "b": wired["b"]}, tokenizer=wired["model"],
                      probing=False, progress=False)
    assert r.models["masked"].lape.probs[A_NEURON].tolist() == [0.0, 0.0]   # gate 0 -> never > 0


def test_several_models_and_labels_file(wired, tmp_path):
    root = wired["root"]
    labels = tmp_path / "labels.jsonl"
    rows = [{"text": t, "label": "short" if len(t.split()) < 8 else "long"} for t in wired["a"]]
    labels.write_text("".join(json.dumps(x) + "\n" for x in rows))
    out = invoke("probe", f"one={wired['model']}", f"two={wired['model0']}", "--text", f"a={root / 'a.txt'}",
                 "--text", f"b={root / 'b.txt'}", "--labels", labels, "--save-neurons", tmp_path / "lape",
                 "--plot", tmp_path / "p.png", "--folds", 3, "-q")
    assert out.exit_code == 0, out.output
    assert "one (" in out.output and "two (" in out.output and "probing labels: long, short" in out.output
    assert surgery.load_neuron_set(tmp_path / "lape" / "two" / "b.json") == {2: [(7, 1.0)]}
    assert (tmp_path / "lape" / "one" / "a.json").exists() and (tmp_path / "p.png").exists()


@pytest.mark.parametrize("case, message", [
    ("empty", "empty.txt: no texts (the file is empty)"),
    ("mismatch", "bad.jsonl:2: mismatched line: keys ['a', 'c'], but line 1 has ['a', 'b']"),
    ("missing", "bad2.jsonl:1: mismatched line: both 'a' and 'b' need a non-empty sentence"),
    ("one-lang", "--save-neurons needs LAPE: texts in at least two languages"),
    # the JSONL and UTF-8 checks are the evaluator's (surgery.io.files): one message for both commands
    ("not-json", "bad3.jsonl:3: invalid JSON (Expecting ',' delimiter at column 11)"),  # blank lines count
    ("not-object", "bad4.jsonl:1: expected a JSON object, got list"),
    ("labels-utf8", "bad5.jsonl: not UTF-8 text (byte 0xff at offset 10)"),
])
def test_input_errors_are_one_line(wired, tmp_path, case, message):
    root = wired["root"]
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.jsonl").write_text('{"a": "a1 a2", "b": "b1 b2"}\n{"a": "a3", "c": "b3"}\n')
    (tmp_path / "bad2.jsonl").write_text('{"a": "a1 a2", "b": ""}\n')
    (tmp_path / "bad3.jsonl").write_text('{"a": "x", "b": "y"}\n\n{"a": "x" "b": "y"}\n')
    (tmp_path / "bad4.jsonl").write_text('["a", "b"]\n')
    (tmp_path / "bad5.jsonl").write_bytes(b'{"text": "\xff", "label": 1}\n')
    args = {"empty": ["--text", f"a={tmp_path / 'empty.txt'}", "--text", f"b={root / 'b.txt'}"],
            "mismatch": ["--parallel", tmp_path / "bad.jsonl"], "missing": ["--parallel", tmp_path / "bad2.jsonl"],
            "one-lang": ["--text", f"a={root / 'a.txt'}", "--save-neurons", tmp_path / "x"],
            "not-json": ["--parallel", tmp_path / "bad3.jsonl"], "not-object": ["--parallel", tmp_path / "bad4.jsonl"],
            "labels-utf8": ["--labels", tmp_path / "bad5.jsonl"]}[case]
    out = invoke("probe", wired["model"], *args, "-q")
    assert out.exit_code == 1
    assert out.output.count("\n") == 1 and out.output.startswith("error: ") and message in out.output


def test_a_model_without_a_recognised_mlp(tmp_path, wired):
    from transformers import MambaConfig, MambaForCausalLM

    MambaForCausalLM(MambaConfig(hidden_size=16, num_hidden_layers=2, vocab_size=130, state_size=4)).save_pretrained(tmp_path / "m")
    root = wired["root"]
    out = invoke("probe", tmp_path / "m", "--tokenizer", wired["model"], "--text", f"a={root / 'a.txt'}",
                 "--text", f"b={root / 'b.txt'}", "-q")
    assert out.exit_code == 1 and out.output.count("\n") == 1
    assert "no MLP found in the layout of model_type 'mamba'" in out.output and "--no-lape" in out.output
    ok = invoke("probe", tmp_path / "m", "--tokenizer", wired["model"], "--text", f"a={root / 'a.txt'}",
                "--text", f"b={root / 'b.txt'}", "--no-lape", "--json", "--folds", 2)
    assert ok.exit_code == 0, ok.output
    assert len(json.loads(ok.stdout)["models"]["m"]["probing"]["accuracy"]) == 2


def test_usage_errors():
    out = invoke("probe", "x", "--text", "nofile")
    assert out.exit_code == 2 and "expected LANG=FILE" in out.output


def test_a_model_in_memory_gives_the_same_result_as_its_files(wired):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = {"a": wired["a"][:12], "b": wired["b"][:12]}
    model = AutoModelForCausalLM.from_pretrained(wired["model"])
    mem = surgery.probe({"m": model}, texts, tokenizer=AutoTokenizer.from_pretrained(wired["model"]), folds=3,
                        progress=False).models["m"]
    disk = surgery.probe(wired["model"], texts, folds=3, progress=False).models["wired"]
    assert mem.path == "(in memory: LlamaForCausalLM)"
    assert np.array_equal(mem.lape.probs, disk.lape.probs) and mem.probing.accuracy == disk.probing.accuracy
    with pytest.raises(surgery.SurgeryError, match="needs a tokenizer"):
        surgery.probe({"m": model}, texts, progress=False)


def test_two_parallel_files_of_the_same_pair_keep_both(wired, tmp_path):
    root = wired["root"]
    half = (root / "ab.jsonl").read_text().splitlines()[:10]
    (tmp_path / "ab2.jsonl").write_text("\n".join(half) + "\n")
    r = surgery.probe(wired["model"], parallel=[root / "ab.jsonl", tmp_path / "ab2.jsonl"], progress=False)
    m = r.models["wired"]
    assert list(m.alignment) == ["a-b", "a-b#2"] and m.lape is None and m.probing is None
    assert [a.retrieval for a in m.alignment["a-b#2"]] == [1.0] * 4


def test_probing_without_scikit_learn_says_how_to_get_it(wired, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    with pytest.raises(surgery.SurgeryError, match=r"pip install 'surgery\[probe\]' \(or run with --no-probing\)"):
        surgery.probe(wired["model"], {"a": wired["a"], "b": wired["b"]}, progress=False)


@pytest.mark.parametrize("arch, act_module, block", [
    ("llama", "model.layers.2.mlp.gate_proj", "model.layers.2"),
    ("phi3", "model.layers.2.mlp.gate_up_proj", "model.layers.2"),       # fused: the first half is the gate
    ("gpt2", "transformer.h.2.mlp.c_fc", "transformer.h.2"),             # no gate, transposed Conv1D
    ("gpt_neox", "gpt_neox.layers.2.mlp.dense_h_to_4h", "gpt_neox.layers.2"),
])
def test_hooks_come_from_the_layout_for_each_family(arch, act_module, block, wired, tmp_path):
    """The probabilities LAPE counts equal the share of positive pre-activations read by an independent hook."""
    from helpers import random_state, save_checkpoint, tiny_config
    from transformers import AutoModelForCausalLM

    from surgery.probing.hooks import find_points

    cfg = tiny_config(arch, vocab_size=130)
    save_checkpoint(tmp_path / arch, random_state(cfg), cfg)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / arch).eval()
    names = {m: n for n, m in model.named_modules()}
    points = find_points(model)
    assert len(points.layers) == 8 == len(points.mlp)
    assert names[points.layers[2][1]] == block and names[points.mlp[2][1]] == act_module
    texts = {"a": wired["a"][:10], "b": wired["b"][:10]}
    r = surgery.probe({arch: model}, texts, tokenizer=wired["model"], probing=False, progress=False)
    seen = []
    module = dict(model.named_modules())[act_module]
    handle = module.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(wired["model"])
    want = []
    with torch.no_grad():
        for lang in ("a", "b"):
            seen.clear()
            for t in texts[lang]:
                model(**tok(t, return_tensors="pt"))
            acts = torch.cat([s[0] for s in seen])
            acts = acts[:, : acts.shape[1] // 2] if arch == "phi3" else acts
            want.append((acts > 0).double().mean(0).numpy())
    handle.remove()
    np.testing.assert_allclose(r.models[arch].lape.probs[2], np.stack(want, 1), atol=1e-12)


def test_a_recipe_is_probed_in_memory_exactly_as_its_written_output(wired, tmp_path):
    """`surgery probe RECIPE.yaml`: the recipe's output built in memory (the bytes `surgery run` writes), so every
    number equals the probe of the written checkpoint; nothing is written."""
    root = wired["root"]
    recipe = tmp_path / "swap.yaml"
    recipe.write_text(f"inputs: {{a: {wired['model']}, b: {wired['model0']}}}\nrecipient: a\noperations:\n"
                      "  - layer_swap: {donor: b, bottom: 1, top: 1, transition: 0}\n"
                      "  - reset_neurons: {to: zero, neurons: {indices: {1: [5]}}}\n")
    written = surgery.run(recipe, tmp_path / "out").output
    args = ["--text", f"a={root / 'a.txt'}", "--text", f"b={root / 'b.txt'}", "--parallel", root / "ab.jsonl",
            "--folds", 3, "--json"]
    mem = invoke("probe", f"m={recipe}", *args)
    disk = invoke("probe", f"m={written}", *args)
    assert mem.exit_code == 0 and disk.exit_code == 0, mem.output + disk.output
    mem, disk = json.loads(mem.stdout)["models"]["m"], json.loads(disk.stdout)["models"]["m"]
    assert mem["path"] == str(recipe) and disk["path"] == str(written)
    for key in ("layers", "tokens", "lape", "probing", "alignment"):
        assert mem[key] == disk[key], key
    assert mem["lape"]["neurons"]["b"]["2"] == [7] and 5 not in mem["lape"]["neurons"].get("a", {}).get("1", [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "swap.yaml"]
    base = surgery.probe(wired["model"], {"a": wired["a"], "b": wired["b"]}, probing=False, progress=False)
    assert base.models["wired"].lape.probs[A_NEURON].tolist() == [1.0, 0.0]   # what the recipe's reset removed
