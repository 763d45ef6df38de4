"""Parity with mergekit-yaml: the same config through `surgery run` gives the same checkpoint.

mergekit-yaml takes ~4 s to import, so the configs are run through its entry point
(``mergekit.scripts.run_yaml.main``, the code behind the ``mergekit-yaml`` script) in ONE
subprocess; one test also runs the ``mergekit-yaml`` script itself against ``surgery run``. The configs:
mergekit_parity_configs.py; the runners and comparisons: mergekit_kit.py.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from helpers import load
from mergekit_kit import (ENV, MERGEKIT_YAML, MK_ARGS, assert_same_checkpoint, make_models, run_mergekit, surgery_cli,
                          write_config)
from mergekit_parity_configs import CONFIGS, COVERED, RANDOM_CONFIGS


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
