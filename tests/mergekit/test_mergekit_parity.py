"""Parity with mergekit-yaml: the same config through `surgery run` gives the same checkpoint.

mergekit-yaml takes ~4 s to import, so the configs are run through its entry point
(``mergekit.scripts.run_yaml.main``, the code behind the ``mergekit-yaml`` script) in ONE
subprocess; one test also runs the ``mergekit-yaml`` script itself against ``surgery run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import load, perturb, random_state, save_checkpoint, tiny_config

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[2]))
MK_ARGS = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"

# {base}, {a}, {b}, {c}: tiny llama checkpoints in bf16; a, b, c are fine-tunes of base.
CONFIGS = {
    "linear": """
        models:
          - model: {a}
            parameters: {{weight: 0.3}}
          - model: {b}
            parameters: {{weight: 0.7}}
        merge_method: linear
    """,
    "linear_gradient_f32": """
        models:
          - model: {a}
            parameters: {{weight: [0.1, 0.9, 0.3]}}
          - model: {b}
            parameters: {{weight: 0.5}}
          - model: {c}
            parameters: {{weight: [1.0, 0.0]}}
        merge_method: linear
        parameters: {{normalize: false}}
        dtype: float32
    """,
    "slerp_filters": """
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 8]
              - model: {b}
                layer_range: [0, 8]
        merge_method: slerp
        base_model: {a}
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: bfloat16
    """,
    "nuslerp": """
        models:
          - model: {a}
            parameters: {{weight: 0.4}}
          - model: {b}
            parameters: {{weight: 0.6}}
        merge_method: nuslerp
    """,
    "nuslerp_base": """
        models:
          - model: {a}
            parameters: {{weight: 0.4}}
          - model: {b}
            parameters: {{weight: 0.6}}
        merge_method: nuslerp
        base_model: {base}
        parameters: {{nuslerp_row_wise: true}}
    """,
    "multislerp": """
        models:
          - model: {a}
            parameters: {{weight: 1.0}}
          - model: {b}
            parameters: {{weight: 2.0}}
          - model: {c}
            parameters: {{weight: 0.5}}
        merge_method: multislerp
    """,
    "task_arithmetic": """
        models:
          - model: {a}
            parameters: {{weight: 0.5}}
          - model: {b}
            parameters: {{weight: [0.2, 0.8]}}
        merge_method: task_arithmetic
        base_model: {base}
        parameters: {{lambda: 0.9}}
    """,
    "ties_3_models": """
        models:
          - model: {a}
            parameters: {{weight: 0.5, density: 0.3}}
          - model: {b}
            parameters: {{weight: 0.3, density: 0.5}}
          - model: {c}
            parameters: {{weight: [0.2, 0.6], density: 0.7}}
          - model: {base}
        merge_method: ties
        base_model: {base}
        parameters: {{normalize: true}}
    """,
    "ties_f32_out_bf16": """
        models:
          - model: {a}
            parameters: {{weight: 1.0, density: 0.5}}
          - model: {b}
            parameters: {{weight: 1.0, density: 0.5}}
        merge_method: ties
        base_model: {base}
        dtype: float32
        out_dtype: bfloat16
    """,
    "ties_filters": """
        models:
          - model: {a}
            parameters:
              weight: 0.6
              density:
                - filter: mlp
                  value: 0.2
                - value: 0.8
          - model: {b}
            parameters: {{weight: 0.4}}
        merge_method: ties
        base_model: {base}
        parameters:
          density: [0.3, 0.9]
          int8_mask: true
    """,
    "dare_ties_density1": """
        models:
          - model: {a}
            parameters: {{weight: 0.5, density: 1.0}}
          - model: {b}
            parameters: {{weight: 0.5, density: 1.0}}
        merge_method: dare_ties
        base_model: {base}
    """,
    "dare_linear_density1": """
        models:
          - model: {a}
            parameters: {{weight: 0.5}}
          - model: {b}
            parameters: {{weight: 0.7}}
        merge_method: dare_linear
        base_model: {base}
    """,
    "della_density1": """
        models:
          - model: {a}
            parameters: {{weight: 0.5, density: 1.0}}
          - model: {b}
            parameters: {{weight: 0.5, density: 1.0}}
        merge_method: della
        base_model: {base}
    """,
    "della_linear_density1": """
        models:
          - model: {a}
            parameters: {{weight: 0.5}}
          - model: {b}
            parameters: {{weight: 0.5}}
        merge_method: della_linear
        base_model: {base}
    """,
    "breadcrumbs": """
        models:
          - model: {a}
            parameters: {{weight: 0.5, density: 0.8, gamma: 0.05}}
          - model: {b}
            parameters: {{weight: 0.5, density: 0.7}}
        merge_method: breadcrumbs
        base_model: {base}
    """,
    "breadcrumbs_ties": """
        models:
          - model: {a}
            parameters: {{weight: 0.5, density: 0.8, gamma: 0.05}}
          - model: {b}
            parameters: {{weight: 0.5, density: 0.7}}
        merge_method: breadcrumbs_ties
        base_model: {base}
    """,
    "model_stock": """
        models:
          - model: {a}
          - model: {b}
          - model: {c}
        merge_method: model_stock
        base_model: {base}
    """,
    "karcher": """
        models:
          - model: {a}
          - model: {b}
          - model: {c}
        merge_method: karcher
        parameters: {{max_iter: 5}}
    """,
    "arcee_fusion": """
        models:
          - model: {a}
        merge_method: arcee_fusion
        base_model: {base}
    """,
    "nearswap": """
        models:
          - model: {a}
        merge_method: nearswap
        base_model: {base}
        parameters: {{t: 0.02}}
    """,
    "sce": """
        models:
          - model: {a}
          - model: {b}
          - model: {c}
        merge_method: sce
        base_model: {base}
        parameters: {{select_topk: 0.5}}
    """,
    "ram": """
        models:
          - model: {a}
          - model: {b}
        merge_method: ram
        base_model: {base}
    """,
    "ramplus_tl": """
        models:
          - model: {a}
          - model: {b}
        merge_method: ramplus_tl
        base_model: {base}
        parameters: {{r: 0.2, alpha: 0.3}}
    """,
    "passthrough_frankenmerge": """
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 6]
          - sources:
              - model: {b}
                layer_range: [2, 8]
                parameters: {{scale: 0.5}}
          - sources:
              - model: {c}
                layer_range: [7, 8]
        merge_method: passthrough
        dtype: float16
    """,
    "ties_slices": """
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 4]
                parameters: {{weight: 0.5, density: 0.5}}
              - model: {b}
                layer_range: [4, 8]
                parameters: {{weight: [0.2, 0.8], density: 0.7}}
              - model: {base}
                layer_range: [0, 4]
          - sources:
              - model: {b}
                layer_range: [2, 8]
              - model: {base}
                layer_range: [2, 8]
            parameters:
              weight: 0.3
              density:
                - filter: self_attn
                  value: 0.4
        merge_method: ties
        base_model: {base}
        parameters: {{density: 0.6, weight: 1.0}}
    """,
}

# random methods: compared statistically (mergekit draws from one global RNG in its own order)
RANDOM_CONFIGS = {
    "dare_linear": """
        models:
          - model: {a}
            parameters: {{weight: 1.0, density: 0.3}}
        merge_method: dare_linear
        base_model: {base}
        dtype: float32
    """,
    "della_linear": """
        models:
          - model: {a}
            parameters: {{weight: 1.0, density: 0.4, epsilon: 0.1}}
        merge_method: della_linear
        base_model: {base}
        dtype: float32
    """,
    "dare_ties": """
        models:
          - model: {a}
            parameters: {{weight: 0.5, density: 0.5}}
          - model: {b}
            parameters: {{weight: 0.5, density: 0.5}}
        merge_method: dare_ties
        base_model: {base}
        dtype: float32
    """,
    "della": """
        models:
          - model: {a}
            parameters: {{weight: 0.5, density: 0.5}}
          - model: {b}
            parameters: {{weight: 0.5, density: 0.6}}
        merge_method: della
        base_model: {base}
        dtype: float32
    """,
}

# every merge method mergekit registers must have a parity config above
COVERED = {"linear", "slerp", "nuslerp", "multislerp", "task_arithmetic", "ties", "dare_ties", "dare_linear",
           "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "model_stock", "karcher",
           "arcee_fusion", "nearswap", "sce", "ram", "ramplus_tl", "passthrough"}

DRIVER = """
import json, sys
from mergekit.scripts.run_yaml import main   # the mergekit-yaml command
for config, out, *args in json.loads(sys.argv[1]):
    main([config, out, *args], standalone_mode=False)
"""


def run_mergekit(jobs: list[tuple[Path, Path, list[str]]], mk_args: list[str] = MK_ARGS) -> None:
    """Run mergekit-yaml's entry point on every (config, out, args) in one process."""
    payload = json.dumps([[str(c), str(o), *mk_args, *a] for c, o, a in jobs])
    r = subprocess.run([sys.executable, "-c", DRIVER, payload], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


def surgery_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgery", *map(str, args)], env=ENV, capture_output=True,
                          text=True)


def make_models(root: Path, arch: str = "llama") -> dict[str, Path]:
    archs = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    cfg = tiny_config(arch, architectures=[archs[arch]])
    base = random_state(cfg, seed=0)
    states = {"base": base, "a": perturb(base, None, 0.02, seed=1), "b": perturb(base, None, 0.02, seed=2),
              "c": perturb(base, None, 0.02, seed=3)}
    return {n: save_checkpoint(root / n, s, cfg, dtype=torch.bfloat16) for n, s in states.items()}


def write_config(folder: Path, name: str, text: str, models: dict[str, Path]) -> Path:
    path = folder / f"{name}.yml"
    path.write_text(textwrap.dedent(text).format(**{k: str(v) for k, v in models.items()}))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("mk_models"))


@pytest.fixture(scope="module")
def mergekit_outputs(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("mk_parity")
    jobs, out = [], {}
    for name, text in CONFIGS.items():
        config = write_config(root, name, text, models)
        out[name] = (config, root / f"mk_{name}")
        jobs.append((config, root / f"mk_{name}", []))
    for name, text in RANDOM_CONFIGS.items():
        config = write_config(root, f"random_{name}", text, models)
        out[f"random_{name}"] = (config, root / f"mk_random_{name}")
        jobs.append((config, root / f"mk_random_{name}", ["--random-seed", "5"]))
    run_mergekit(jobs)
    return out


def assert_same_checkpoint(mk: Path, ours: Path) -> None:
    a, b = load(mk), load(ours)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), f"{name}: max diff {(a[name].float() - b[name].float()).abs().max()}"
    assert_same_config(mk, ours)


def assert_same_config(mk: Path, ours: Path) -> None:
    ca = json.loads((mk / "config.json").read_text())
    cb = json.loads((ours / "config.json").read_text())
    ca.pop("transformers_version", None), cb.pop("transformers_version", None)
    assert ca == cb


def test_every_registered_method_is_covered():
    from mergekit import merge_methods

    from surgery.mergekit.methods import METHOD_NAMES

    # mergekit's own methods; surgery's plugin methods are there too once any test ran `surgery mergekit`
    registered = {m.spec.name for m in merge_methods.registered_methods()} - set(METHOD_NAMES)
    assert registered <= COVERED, f"no parity config for {registered - COVERED}"
    used = {line.split(":", 1)[1].strip() for text in CONFIGS.values() for line in text.splitlines()
            if line.strip().startswith("merge_method:")}
    assert COVERED <= used


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_mergekit_yaml(name, mergekit_outputs, tmp_path):
    from surgery import run

    config, mk_out = mergekit_outputs[name]
    run(config, tmp_path / "out")
    assert_same_checkpoint(mk_out, tmp_path / "out")


@pytest.mark.slow
def test_mergekit_yaml_script_vs_surgery_cli(models, tmp_path):
    config = write_config(tmp_path, "ties", CONFIGS["ties_3_models"], models)
    r = subprocess.run([str(MERGEKIT_YAML), str(config), str(tmp_path / "mk"), *MK_ARGS], env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = surgery_cli("run", config, "-o", tmp_path / "ours", "-q")
    assert r.returncode == 0, r.stderr
    assert_same_checkpoint(tmp_path / "mk", tmp_path / "ours")
    assert (tmp_path / "ours" / "surgery_manifest.json").exists()


def kept_fraction_and_scale(out: dict, base: dict, model: dict) -> tuple[float, float]:
    """Over the big tensors: the fraction of the model's delta that survives, and the median scale."""
    kept = total = 0
    scales = []
    for name, t in out.items():
        if t.numel() < 1000:
            continue
        delta = model[name].float() - base[name].float()
        got = t.float() - base[name].float()
        nz = delta != 0
        k = (got != 0) & nz
        kept += int(k.sum())
        total += int(nz.sum())
        scales.append((got[k] / delta[k]).median())
    return kept / total, float(torch.stack(scales).median())


@pytest.mark.slow
@pytest.mark.parametrize("name, density", [("dare_linear", 0.3), ("della_linear", 0.4)])
def test_random_methods_keep_density_and_rescale(name, density, models, mergekit_outputs, tmp_path):
    from surgery import run

    config, mk_out = mergekit_outputs[f"random_{name}"]
    run(config, tmp_path / "out", random_seed=5)
    base, a = load(models["base"]), load(models["a"])
    for out in (load(mk_out), load(tmp_path / "out")):
        kept, scale = kept_fraction_and_scale(out, base, a)
        assert abs(kept - density) < 0.02, kept
        assert abs(scale - 1 / density) / (1 / density) < 0.1, scale  # rescaled to keep the L1 norm
    ours = load(tmp_path / "out")
    assert not all(torch.equal(ours[n], load(mk_out)[n]) for n in ours)  # really random, really seeded


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dare_ties", "della"])
def test_random_ties_methods_match_mergekit_statistically(name, models, mergekit_outputs, tmp_path):
    from surgery import run

    config, mk_out = mergekit_outputs[f"random_{name}"]
    run(config, tmp_path / "out", random_seed=5)
    base, mk, ours = load(models["base"]), load(mk_out), load(tmp_path / "out")
    assert sorted(mk) == sorted(ours)
    changed = lambda out: sum(int((out[n] != base[n]).sum()) for n in out) / sum(t.numel() for t in out.values())  # noqa: E731
    norm = lambda out: sum(float((out[n].float() - base[n].float()).abs().sum()) for n in out)  # noqa: E731
    assert abs(changed(mk) - changed(ours)) < 0.01
    assert abs(norm(mk) - norm(ours)) / norm(mk) < 0.03
    for n in ours:
        assert ours[n].dtype == mk[n].dtype and ours[n].shape == mk[n].shape
