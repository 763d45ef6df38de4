"""Every bad input: one clear line naming file:line and YAML path, exit code 1, nothing written."""

import textwrap

import pytest
from helpers import random_state, run_cli, save_checkpoint, tiny_config

import surgery
from surgery.recipe.parsing import parse_expression, parse_layers, parse_size


def write(tmp_path, family, body, name="r.yaml"):
    head = "inputs:\n" + "".join(f"  {k}: {v}\n" for k, v in family.items())
    path = tmp_path / name
    path.write_text(head + textwrap.dedent(body))
    return path


def cli(*args, cwd=None):
    return run_cli(*args, cwd=cwd)


CASES = [
    # (recipe body after the 4 input lines, expected fragments)
    ("recipient: task\noperations:\n  - layer_swap: {donor: lang, bottom: 2, transtion: 1}\n",
     [":8: operations.0.layer_swap.transtion", "unknown key 'transtion'; did you mean 'transition'?"]),
    ("recipient: task\noutptu: {dtype: bfloat16}\n",
     [":7: outptu", "did you mean 'output'?"]),
    ("recipient: task\noperations:\n  - layer_swap: {donor: lang, bottom: two}\n",
     [":8: operations.0.layer_swap.bottom", "valid integer", "'two'"]),
    ("recipient: task\noutput:\n  dtype: float8\n",
     [":8: output.dtype", "'float32', 'float16' or 'bfloat16'"]),
    ("recipient: task\noperations:\n  - layer_swap: {donor: lang, bottom: 6, top: 4}\n",
     [":8: operations.0.layer_swap.top", "layer out of range", "8 layers"]),
    ("recipient: task\noperations:\n  - take: {from: lang, select: {layers: '2-9'}}\n",
     [":8: operations.0.take.select.layers", "layer 8 is out of range: the model has 8 layers (0-7)"]),
    ("recipient: task\noperations:\n  - layer_swap: {donor: lnag, bottom: 1}\n",
     [":8: operations.0.layer_swap.donor", "unknown input 'lnag'; did you mean 'lang'?"]),
    ("recipient: task\noperations:\n  - layer_swop: {donor: lang}\n",
     [":8: operations.0.layer_swop", "unknown operation 'layer_swop'; did you mean 'layer_swap'?"]),
    ("recipient: task\noperations:\n  - arithmetic: {expr: 'task * lang'}\n",
     [":8: operations.0.arithmetic.expr", "only scalar * checkpoint is linear"]),
    ("recipient: task\noperations:\n  - take: {from: lang, select: {modules: [mpl]}}\n",
     [":8: operations.0.take.select.modules", "unknown module kind 'mpl'; did you mean 'mlp'?"]),
    ("recipient: task\nrecipient: lang\n",
     [":7", "duplicate key 'recipient'"]),
    ("recipient: task\noperations:\n  - take: {from: lang}\n    extra: 1\n",
     [":8: operations.0", "one key, the operation name"]),
    ("recipient: task\noutput: {shard_size: 5 parsecs}\n",
     [":7: output.shard_size", "expected a size like 500MB or 2GB"]),
    ("recipient: task\noperations: [\n",
     ["invalid YAML"]),
]


@pytest.mark.parametrize("body,expected", CASES, ids=[c[1][-1][:40] for c in CASES])
def test_recipe_errors(family, tmp_path, body, expected):
    path = write(tmp_path, family, body)
    with pytest.raises(surgery.SurgeryError) as err:
        surgery.run(path, tmp_path / "out")
    msg = str(err.value)
    assert msg.startswith(str(path)), msg
    for frag in expected:
        assert frag in msg, msg
    assert "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line_exit_1_and_writes_nothing(family, tmp_path):
    path = write(tmp_path, family, CASES[0][0])
    r = cli("run", path, "-o", tmp_path / "out")
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and "did you mean 'transition'" in r.stderr
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out*")) == []
    # --debug shows the traceback
    r = cli("--debug", "validate", path)
    assert r.returncode == 1 and "Traceback" in r.stderr and "RecipeError" in r.stderr


def test_missing_checkpoint(family, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"inputs:\n  a: {family['task']}\n  b: ./nowhere/model\n")
    r = cli("validate", path)
    assert r.returncode == 1
    assert f"{path}:3: inputs.b: checkpoint not found: './nowhere/model'" in r.stderr


def test_missing_recipe_file(tmp_path):
    r = cli("plan", tmp_path / "nope.yaml")
    assert r.returncode == 1 and "recipe file not found" in r.stderr


def test_shapes_that_do_not_line_up(family, tmp_path):
    cfg = tiny_config("llama", intermediate_size=40)
    other = save_checkpoint(tmp_path / "narrow", random_state(cfg, 5), cfg)
    path = tmp_path / "r.yaml"
    path.write_text(f"inputs:\n  task: {family['task']}\n  narrow: {other}\n"
                    "operations:\n  - arithmetic: {expr: 'task + 0.1*(narrow - task)', select: {layers: 3}}\n")
    r = cli("run", path, "-o", tmp_path / "out")
    assert r.returncode == 1
    assert "inputs don't line up for tensor 'model.layers.3.mlp.down_proj.weight'" in r.stderr
    assert "shapes [32, 48] and [32, 40]" in r.stderr and "task: [32, 48]" in r.stderr
    assert not (tmp_path / "out").exists()


def test_tensor_names_that_do_not_line_up(family, tmp_path):
    cfg = tiny_config("llama")  # same depth (another depth is refused first: test_real_model_shapes.py)
    state = random_state(cfg, 5)
    del state["model.layers.7.input_layernorm.weight"]
    short = save_checkpoint(tmp_path / "short", state, cfg)
    path = tmp_path / "r.yaml"
    path.write_text(f"inputs:\n  task: {family['task']}\n  short: {short}\n"
                    "operations:\n  - layer_swap: {donor: short, top: 1}\n")
    r = cli("validate", path)
    assert r.returncode == 1
    assert ":3: inputs.short: tensor 'model.layers.7.input_layernorm.weight' is missing in input 'short'" in r.stderr
    assert "#1 layer_swap" in r.stderr


def test_usage_errors_exit_2(tmp_path):
    r = cli("run")
    assert r.returncode == 2 and "Missing argument" in r.stderr
    r = cli("run", "x.yaml")
    assert r.returncode == 2 and "Missing option '-o'" in r.stderr
    r = cli("frobnicate")
    assert r.returncode == 2


def test_pickle_bin_refused_then_converted(family, tmp_path):
    import torch
    from safetensors.torch import load_file

    state = load_file(str(family["lang"] / "model.safetensors"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "config.json").write_text((family["lang"] / "config.json").read_text())
    torch.save(state, bindir / "pytorch_model.bin")
    path = tmp_path / "r.yaml"
    path.write_text(f"inputs:\n  task: {family['task']}\n  old: {bindir}\n"
                    "operations:\n  - take: {from: old, select: {layers: 0}}\n")
    r = cli("validate", path)
    assert r.returncode == 1 and "pickle .bin" in r.stderr and "--convert-bin" in r.stderr
    env_cache = tmp_path / "cache"
    r = run_cli("run", path, "-o", tmp_path / "out", "-q", "--convert-bin", env={"SURGERY_CACHE": str(env_cache)})
    assert r.returncode == 0, r.stderr
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], state["model.layers.0.mlp.up_proj.weight"])
    assert list(env_cache.glob("converted/*/pytorch_model.safetensors"))


def test_parsers():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(123) == 123
    assert parse_layers("0-2, -1", 8) == [0, 1, 2, 7] and parse_layers(["-2--1", 3], 8) == [6, 7, 3]
    assert parse_expression("math + 1.0*(sw - en)") == {"math": 1.0, "sw": 1.0, "en": -1.0}
    assert parse_expression("base + 0.7*(a - base) + 0.3*(b - base)") == {"a": 0.7, "b": 0.3}
    assert parse_expression("-(a - b)/2") == {"a": -0.5, "b": 0.5}
    for bad, msg in [("a + 1", "bare number"), ("a ** 2", "only \\+, -"), ("a / b", "only \\+, -"),
                     ("f(a)", "unsupported"),
                     ("a +", "cannot parse")]:
        with pytest.raises(ValueError, match=msg):
            parse_expression(bad)
    with pytest.raises(ValueError, match="empty layer range"):
        parse_layers("5-2", 8)
