"""The `merge` operation: mergekit methods on any selection of tensors, in ordinary recipes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import load, raw_bytes, run_cli

ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))


def recipe_file(tmp_path, family, body: str, name="r.yaml") -> Path:
    inputs = "\n".join(f"  {n}: {p}" for n, p in family.items())
    path = tmp_path / name
    path.write_text(f"inputs:\n{inputs}\nrecipient: base\n{body}")
    return path


def merged(method, tensors, base_index=None, **parameters):
    from mergekit.merge_methods.api import merge_tensors

    return merge_tensors(tensors, method, parameters=parameters, base_index=base_index)


def test_ties_middle_layers_and_layer_swap_outer(family, tmp_path):
    from safetensors import safe_open

    from surgery import run

    path = recipe_file(tmp_path, family, """
operations:
  - layer_swap: {donor: lang, bottom: 2, top: 2}
  - merge:
      method: ties
      base: base
      models:
        lang: {weight: 0.5, density: 0.5}
        task: {weight: 0.8, density: 0.3}
      select: {layers: "2-5"}
""")
    run(path, tmp_path / "out")
    out = load(tmp_path / "out")
    src = {n: safe_open(str(p / "model.safetensors"), "pt") for n, p in family.items()}
    for name, t in out.items():
        if ".layers.0." in name or ".layers.7." in name:
            assert raw_bytes(t) == raw_bytes(src["lang"].get_tensor(name)), name
        elif ".layers.3." in name:
            want = merged("ties", [src[n].get_tensor(name) for n in ("lang", "task", "base")], base_index=2,
                          weight={0: 0.5, 1: 0.8}, density={0: 0.5, 1: 0.3})
            assert torch.equal(t, want), name
        elif ".layers." not in name:
            assert raw_bytes(t) == raw_bytes(src["base"].get_tensor(name)), name


def test_gradient_spreads_over_the_selected_layers(family, tmp_path):
    from safetensors import safe_open

    from surgery import build_plan, load_recipe, run

    path = recipe_file(tmp_path, family, """
operations:
  - merge:
      method: linear
      models:
        lang: {weight: [0.0, 1.0]}
        task: {weight: 1.0}
      parameters: {normalize: false}
      select: {layers: "2-5", modules: [mlp]}
""")
    plan_text = build_plan(load_recipe(path)).format()
    assert "linear: lang(weight=0.3333) + task(weight=1)" in plan_text
    run(path, tmp_path / "out")
    out = load(tmp_path / "out")
    src = {n: safe_open(str(p / "model.safetensors"), "pt") for n, p in family.items()}
    for layer, w in zip(range(2, 6), (0.0, 1 / 3, 2 / 3, 1.0)):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        want = merged("linear", [src["lang"].get_tensor(name), src["task"].get_tensor(name)],
                      weight=[w, 1.0], normalize=False)
        assert torch.equal(out[name], want), layer
    attn = "model.layers.3.self_attn.q_proj.weight"
    assert raw_bytes(out[attn]) == raw_bytes(src["base"].get_tensor(attn))


def test_plan_shows_method_and_weights(family, tmp_path):
    path = recipe_file(tmp_path, family, """
operations:
  - merge:
      method: task_arithmetic
      base: base
      models: {lang: {weight: 0.7}, task: {weight: 0.25}}
""")
    r = run_cli("plan", path)
    assert r.returncode == 0, r.stderr
    assert "task_arithmetic: lang(weight=0.7) + task(weight=0.25) + base [base]" in r.stdout


@pytest.mark.parametrize("body, message", [
    ("merge: {method: tie, base: base, models: [lang]}",
     "r.yaml:8: operations.0.merge.method: unknown merge method 'tie'; did you mean 'ties'?"),
    ("merge: {method: ties, base: base, models: {lang: {weight: 1, densty: 0.5}}}",
     "r.yaml:8: operations.0.merge.models.lang.densty: unknown parameter 'densty' for merge method 'ties'; "
     "did you mean 'density'?"),
    ("merge: {method: ties, base: base, models: {lang: {weight: 1}}, parameters: {lamda: 2}}",
     "unknown parameter 'lamda' for merge method 'ties'; did you mean 'lambda'?"),
    ("merge: {method: linear, models: [lang, task]}",
     "merge method 'linear' needs parameter 'weight' for every model"),
    ("merge: {method: linear, models: {lang: {weight: abc}, task: {weight: 1}}}", "bad parameter value for tensor"),
    ("merge: {method: linear, models: {lang: {weight: {filter: mlp}}}}", "bad value for 'weight'"),
    ("merge: {method: slerp, base: base, models: {lang: null, task: null}, parameters: {t: 0.5}}",
     "merge method 'slerp' requires exactly 2 inputs; got 3"),
    ("merge: {method: ties, models: {lang: {weight: 1}}}", "merge method 'ties' requires a base input"),
    ("merge: {method: linear, models: {lnag: {weight: 1}}}", "unknown input 'lnag'; did you mean 'lang'?"),
])
def test_bad_merge_operations(family, tmp_path, body, message):
    from surgery import SurgeryError, build_plan, load_recipe

    path = recipe_file(tmp_path, family, f"operations:\n  - {body}\n")
    with pytest.raises(SurgeryError) as e:
        build_plan(load_recipe(path))
    assert message in str(e.value)


@pytest.mark.parametrize("body, message", [
    ("merge: {method: ties, base: base, models: {lang: {weight: 1, normalize: false}}}",
     ":8: operations.0.merge.models.lang.normalize: 'normalize' is a shared parameter of ties, so a per-model "
     "value is ignored (as mergekit ignores it); set it under 'parameters'"),
    ("merge: {method: model_stock, base: base, models: {lang: {weight: 1}, task: {}, en: {}}}",
     "parameter 'weight' is ignored: merge method 'model_stock' does not use it"),
    ("merge: {method: slerp, base: base, models: [lang], parameters: {t: 0.5, normalize: true}}",
     "parameter 'normalize' is ignored: merge method 'slerp' does not use it"),
])
def test_parameters_mergekit_ignores_are_warnings(family, tmp_path, body, message):
    """Names valid for other methods (or shared ones given per model) are ignored, as mergekit ignores them."""
    from surgery import build_plan, load_recipe

    path = recipe_file(tmp_path, family, f"operations:\n  - {body}\n")
    with pytest.warns(UserWarning) as caught:
        plan = build_plan(load_recipe(path))
    assert any(message in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert plan.entries[0].node.op == "mergekit"


def test_bad_merge_operation_cli_is_one_line(family, tmp_path):
    path = recipe_file(tmp_path, family, "operations:\n  - merge: {method: dare_tie, base: base, models: [lang]}\n")
    r = run_cli("run", path, "-o", tmp_path / "o")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: {path}:8: operations.0.merge.method: unknown merge method 'dare_tie'; did you mean 'dare_ties'? "
        "(methods: " + r.stderr.split("(methods: ")[1].strip()]
    assert not (tmp_path / "o").exists()


DARE = """
operations:
  - merge:
      method: dare_linear
      base: base
      models: {{en: {{weight: 1.0, density: 0.3}}}}
      select: {{layers: "{layers}"}}
"""


@pytest.mark.slow
def test_random_seed_reproducible_and_order_independent(family, tmp_path):
    full = recipe_file(tmp_path, family, DARE.format(layers="0-7"), "full.yaml")
    part = recipe_file(tmp_path, family, DARE.format(layers="3") + "seed: 11\n", "part.yaml")

    def cli(recipe, out, *args):
        r = run_cli("run", recipe, "-o", tmp_path / out, "-q", *args)
        assert r.returncode == 0, r.stderr
        return load(tmp_path / out)

    a, b = cli(full, "a", "--random-seed", "11"), cli(full, "b", "--random-seed", "11")
    c = cli(full, "c", "--random-seed", "12")
    d = cli(part, "d")  # seed from the recipe; only layer 3 merged
    assert all(torch.equal(a[n], b[n]) for n in a)
    name = "model.layers.3.mlp.down_proj.weight"
    assert not torch.equal(a[name], c[name])
    for n in a:  # each tensor has its own seed: the same draws whatever else is merged
        if ".layers.3." in n:
            assert torch.equal(a[n], d[n]), n
    import json

    assert json.loads((tmp_path / "a" / "surgery_manifest.json").read_text())["seed"] == 11


def test_stack_from_other_inputs(family, tmp_path):
    from safetensors import safe_open

    from surgery import build_plan, load_recipe, run

    path = recipe_file(tmp_path, family, """
stack:
  - {layers: "0-5"}
  - {layers: "2-7", from: lang}
  - {layers: "7", from: task}
""")
    plan = build_plan(load_recipe(path))
    assert len(plan.layer_map) == 13
    run(path, tmp_path / "out")
    out = load(tmp_path / "out")
    src = {n: safe_open(str(p / "model.safetensors"), "pt") for n, p in family.items()}
    for out_layer, (donor, layer) in {0: ("base", 0), 5: ("base", 5), 6: ("lang", 2), 11: ("lang", 7),
                                      12: ("task", 7)}.items():
        want = src[donor].get_tensor(f"model.layers.{layer}.mlp.down_proj.weight")
        assert raw_bytes(out[f"model.layers.{out_layer}.mlp.down_proj.weight"]) == raw_bytes(want)
    import json

    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 13


@pytest.mark.parametrize("body, message", [
    ("stack:\n  - {layers: '0-3', from: lagn}\n", "r.yaml:8: stack.0.from: unknown input 'lagn'; did you mean 'lang'?"),
    ("stack:\n  - {layers: '0-3', sources: {lang: '0-2'}}\n",
     "stack.0.sources.lang: 3 layers, but 'layers' has 4; each output layer needs one source layer per input"),
    ("stack:\n  - {layers: '0-3', from: lang, form: task}\n", "unknown key 'form'; did you mean 'from'?"),
    ("stack:\n  - {layers: '0-9', from: lang}\n",
     "layer 8 is out of range: the model has 8 layers (0-7) (input 'lang')"),
])
def test_bad_stacks(family, tmp_path, body, message):
    from surgery import SurgeryError, build_plan, load_recipe

    path = recipe_file(tmp_path, family, body)
    with pytest.raises(SurgeryError) as e:
        build_plan(load_recipe(path))
    assert message in str(e.value)


@pytest.mark.parametrize("method, params", [
    ("ties", {"weight": [0.5, 0.3, 0.9], "density": [0.3, 0.5, 0.7]}),
    ("ties", {"weight": [1.0, 1.0, 1.0], "density": [0.5, 0.5, 0.5], "int8_mask": True, "lambda": 1.3}),
    ("task_arithmetic", {"weight": [0.5, -0.3, 0.9], "normalize": True}),
    ("task_arithmetic", {"weight": [0.5, 0.3, 0.9], "lambda": 0.7}),
    ("breadcrumbs", {"weight": [0.5, 0.3, 0.9], "density": [0.8, 0.9, 0.7]}),
    ("breadcrumbs_ties", {"weight": [0.5, 0.3, 0.9], "density": [0.8, 0.9, 0.7], "gamma": [0.01, 0.05, 0.1]}),
])
def test_parallel_kernel_is_bitwise_mergekit(method, params):
    """The parallel driver used for these methods gives exactly mergekit's result (bf16, many ties)."""
    from surgery.merge.table import choose

    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(300, 257, generator=gen) * 0.02).bfloat16()
    tensors = [(base.float() + torch.randn(base.shape, generator=gen) * 0.003).bfloat16() for _ in range(3)] + [base]
    ids = ["a", "b", "c", "base"]
    p = {"method": method, "ids": ids, "base_index": 3, "kernel": "exact", "shared": {}, "per_input": {}}
    backend = choose(p, ["BF16"] * 4, host=False)
    assert backend.name == "torch"
    per_input = {k: dict(zip(ids[:3], v)) for k, v in params.items() if isinstance(v, list)}
    shared = {k: v for k, v in params.items() if not isinstance(v, list)}
    want = merged(method, tensors, base_index=3, **{k: list(v.values()) for k, v in per_input.items()}, **shared)
    for chunk in (1000, 1 << 18):  # several chunks, one chunk
        got = backend.kernel(tensors, p, {**shared, **per_input}, chunk=chunk)
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_mirrored_setting_resolution_matches_mergekit():
    from mergekit.config import ConditionalParameter, evaluate_setting as mk_evaluate

    from surgery.merge.settings import evaluate_setting, parse_setting

    def validate(v):
        return float(v)

    cases = [0.5, [0.0, 1.0], [0.1, 0.9, 0.3], [{"filter": "mlp", "value": [1, 0]}, {"value": 0.25}],
             {"filter": "self_attn", "value": 0.7}, [{"filter": "nothing", "value": 1}]]
    for case in cases:
        mk_case = (ConditionalParameter(**case) if isinstance(case, dict) else
                   [ConditionalParameter(**c) for c in case] if isinstance(case, list) and isinstance(case[0], dict)
                   else case)
        for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
            for t in (0.0, 0.3, 1 / 3, 0.5, 0.99, 1.0):
                assert evaluate_setting(name, parse_setting(case), t, validate=validate) == \
                    mk_evaluate(name, mk_case, t, validate=validate), (case, name, t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fast_ties_kernel_differs_only_at_threshold_ties(dtype):
    from mergekit.sparsify import magnitude

    from surgery.merge.gta import gta_parallel
    from surgery.merge.ties import magnitude_exact, magnitude_select

    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(400, 301, generator=gen) * 0.01).to(dtype)
    for density in (0.2, 0.5, 0.9):
        want, got = magnitude(x, density), magnitude_select(x, density)
        assert int((want != 0).sum()) == int((got != 0).sum())
        threshold = x.abs().float().reshape(-1).kthvalue(x.numel() - max(1, int(density * x.numel())) + 1).values
        differ = want != got
        assert torch.all(x.abs().float()[differ] == threshold)  # only entries at the threshold magnitude
        if dtype == torch.float32:
            assert not differ.any()
    base = (torch.randn(50, 40, generator=gen) * 0.02).to(dtype)
    tensors = [base + (torch.randn(base.shape, generator=gen) * 0.003).to(dtype) for _ in range(2)] + [base]
    params = {"weight": {"a": 0.6, "b": 0.4}, "density": {"a": 0.5, "b": 0.5}}
    p = {"method": "ties", "ids": ["a", "b", "base"], "base_index": 2}
    exact = gta_parallel(tensors, p, dict(params), magnitude=magnitude_exact)
    fast = gta_parallel(tensors, p, dict(params), magnitude=magnitude_select)
    if dtype == torch.float32:
        assert torch.equal(exact, fast)
    else:
        assert 0 < (exact != fast).float().mean() < 0.03  # small bf16 tensors: many equal magnitudes


def test_fast_kernels_cli_option(family, tmp_path):
    from surgery.operations.merge import use_fast_kernels
    from surgery import load_recipe

    path = recipe_file(tmp_path, family,
                       "operations:\n  - merge: {method: ties, base: base, models: {en: {weight: 1, density: 0.5}}}\n")
    recipe = use_fast_kernels(load_recipe(path))
    assert recipe.operations[0].kernel == "fast"
    r = run_cli("run", path, "-o", tmp_path / "o", "-q", "--fast-kernels")
    assert r.returncode == 0, r.stderr
    out, base, en = load(tmp_path / "o"), load(family["base"]), load(family["en"])
    name = "model.layers.2.mlp.up_proj.weight"
    kept = ((out[name] != base[name]) & (en[name] != base[name])).float().sum() / (en[name] != base[name]).float().sum()
    assert abs(float(kept) - 0.5) < 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("normalize", [True, False])
def test_chunked_linear_kernel_is_bitwise_mergekit(dtype, normalize):
    from surgery.merge.linear import torch_chunked

    gen = torch.Generator().manual_seed(2)
    tensors = [(torch.randn(1100, 1000, generator=gen) * 0.02).to(dtype) for _ in range(3)]  # > one chunk
    weights = [0.4, -0.35, 1.7]
    want = merged("linear", tensors, weight=weights, normalize=normalize)
    got = torch_chunked(tensors, {"method": "linear", "ids": [0, 1, 2], "base_index": None},
                        {"weight": dict(enumerate(weights)), "normalize": normalize})
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_input_hashes_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    import hashlib

    from surgery.io.checkpoint import sha256_file

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    want = hashlib.sha256(b"abc" * 1000).hexdigest()
    assert sha256_file(f) == want
    assert len(list((tmp_path / "cache" / "sha256").iterdir())) == 1
    assert sha256_file(f) == want  # from the cache
    f.write_bytes(b"abd" * 1000)  # new content: new mtime
    os.utime(f, ns=(1, 2))
    assert sha256_file(f) == hashlib.sha256(b"abd" * 1000).hexdigest()
