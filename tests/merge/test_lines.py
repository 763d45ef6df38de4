"""lines (LiNeS): the base method's merge, its task vector scaled by depth, alpha + (beta - alpha) * l / (L - 1)."""

from __future__ import annotations

import pytest
import torch
from own_methods import LAYERS, block, error_of, run_merge

from helpers import raw_bytes
from surgery.merge.lines import depth_scale


def mergekit(method, inputs: dict, models, **parameters):
    from mergekit.merge_methods.api import merge_tensors

    return merge_tensors([inputs[m] for m in (*models, "base")], method, parameters=parameters,
                         base_index=len(models))


def test_depth_scale_is_the_papers_line():
    assert depth_scale(0.2, 0.9, 0, 8) == 0.2 and depth_scale(0.2, 0.9, 7, 8) == 0.9
    assert depth_scale(0.2, 0.9, 3, 8) == pytest.approx(0.2 + 0.7 * 3 / 7)
    assert depth_scale(0.2, 0.9, None, 8) == 0.2  # outside the blocks: the shallowest factor
    assert depth_scale(0.2, 0.9, 0, 1) == 0.2


def test_recipe_on_the_family_scales_task_arithmetic_by_depth(family, tmp_path):
    out, inputs = run_merge(tmp_path, family, "{method: lines, base: base, models: {lang: {weight: 1.0}, "
                                              "task: {weight: 0.6}}, parameters: {alpha: 0.25, beta: 1.5}}")
    for name, t in out.items():
        layer = block(name)
        s = 0.25 if layer is None else 0.25 + 1.25 * layer / (LAYERS - 1)
        merged = mergekit("task_arithmetic", inputs[name], ("lang", "task"), weight={0: 1.0, 1: 0.6})
        b = inputs[name]["base"].float()
        want = (b + s * (merged.float() - b)).to(torch.bfloat16)
        assert raw_bytes(t) == raw_bytes(want), name


def test_beta_equal_alpha_equal_one_is_the_base_method_bitwise(family, tmp_path):
    out, inputs = run_merge(tmp_path, family, "{method: lines, base: base, models: {lang: {weight: 0.7, "
                                              "density: 0.4}, en: {weight: 0.5}}, parameters: {base_method: ties, "
                                              "alpha: 1, beta: 1, normalize: false}}")
    for name, t in out.items():
        want = mergekit("ties", inputs[name], ("lang", "en"), weight={0: 0.7, 1: 0.5}, density={0: 0.4, 1: 1.0},
                        normalize=False)
        assert raw_bytes(t) == raw_bytes(want), name


@pytest.mark.parametrize("merge,where,message", [
    ("{method: lines, base: base, models: {lang: {weight: 1}}, parameters: {base_method: tie}}",
     "operations.0.merge.parameters.base_method", "base_method of lines must be one of task_arithmetic, ties, "
                                                  "dare_ties"),
    ("{method: lines, base: base, models: {lang: {weight: 1, gamma: 0.1}}, parameters: {base_method: ties}}",
     "operations.0.merge.models.lang.gamma", "parameter 'gamma' is not one of base_method ties's"),
    ("{method: lines, base: base, models: {lang: {weight: 1}}, parameters: {betta: 1}}",
     "operations.0.merge.parameters.betta", "did you mean 'beta'?"),
    ("{method: lines, base: base, models: [lang]}", "operations.0.merge.models",
     "needs parameter 'weight' for every model"),
])
def test_bad_parameters_are_one_line_naming_the_yaml_path(family, tmp_path, merge, where, message):
    msg = error_of(tmp_path, family, merge)
    assert len(msg.splitlines()) == 1 and f": {where}: " in msg and message in msg, msg


def test_a_random_base_method_takes_the_recipe_seed(family, tmp_path):
    from surgery.merge.settings import tensor_seed

    merge = ("{method: lines, base: base, models: {lang: {weight: 1.0, density: 0.5}}, "
             "parameters: {base_method: dare_ties, alpha: 1, beta: 1}}")
    from own_methods import recipe

    from helpers import load
    from surgery import run

    path = recipe(tmp_path, family, merge)
    path.write_text(path.read_text() + "seed: 7\n")
    run(path, tmp_path / "out")
    out = load(tmp_path / "out")
    name = "model.layers.1.mlp.up_proj.weight"
    inputs = {n: load(p)[name] for n, p in family.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tensor_seed(7, name))
        want = mergekit("dare_ties", inputs, ("lang",), weight={0: 1.0}, density={0: 0.5})
    assert raw_bytes(out[name]) == raw_bytes(want)


@pytest.mark.slow  # a CLI process
def test_cli_error_is_one_line_exit_1_nothing_written(family, tmp_path):
    from own_methods import recipe

    from helpers import run_cli

    path = recipe(tmp_path, family, "{method: lines, base: base, models: {lang: {weight: 1}}, "
                                    "parameters: {base_method: dare_tie}}")
    r = run_cli("run", path, "-o", tmp_path / "o")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: {path}:8: operations.0.merge.parameters.base_method: base_method of lines must be one of "
        "task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear "
        "(got 'dare_tie'); did you mean 'dare_ties'?"]
    assert not (tmp_path / "o").exists()


def test_the_pass_through_parameters_are_the_base_methods_in_mergekits_registry():
    from surgery.merge.specs import LOCAL, from_mergekit, get_method

    for wrapper in ("lines", "consensus"):
        spec = LOCAL[wrapper]
        passed = {p.name for p in spec.parameters} - set(spec.own)
        theirs = {p.name for m in spec.base_methods for p in from_mergekit(get_method(m)).parameters}
        assert passed == theirs, wrapper
