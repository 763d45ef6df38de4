"""One model loader (surgery.models.load_model), one reference resolver (surgery.io.reference) and one
progress-bar rule (surgery.io.progress) for every command."""

import json

import pytest
import torch
from helpers import load, raw_bytes, run_cli
from test_hub_download import files, hub  # noqa: F401  (the fake Hub's fixtures)

import surgery
from surgery.errors import SurgeryError
from surgery.io.reference import CHECKPOINT, resolve_reference
from surgery.models import load_model

MISSING = "checkpoint not found: './nowhere/model' is neither a local path nor a Hub id like 'org/name' or " \
          "'org/name@revision'"


def swap_recipe(ck, path):
    path.write_text(f"inputs: {{math: {ck / 'math'}, sw: {ck / 'swahili'}}}\nrecipient: math\noperations:\n"
                    "  - layer_swap: {donor: sw, bottom: 2, top: 2, transition: 1}\n")
    return path


# ---------------------------------------------------------------- the resolver

def test_references_resolve_to_their_kind(demo_dir, tmp_path, monkeypatch):
    ck = demo_dir / "checkpoints"
    recipe = swap_recipe(ck, tmp_path / "r.yaml")
    assert resolve_reference(ck / "base").kind == "checkpoint" and resolve_reference(ck / "base").path == ck / "base"
    assert resolve_reference(ck / "base" / "model.safetensors").kind == "checkpoint"
    assert resolve_reference(recipe).kind == "recipe"
    remote = resolve_reference("org/name@v1.0")
    assert (remote.kind, remote.repo_id, remote.revision, remote.path) == ("hub", "org/name", "v1.0", None)
    (tmp_path / "org" / "name").mkdir(parents=True)   # a local folder wins over the Hub id it spells
    monkeypatch.chdir(tmp_path)
    assert resolve_reference("org/name").kind == "checkpoint"
    (tmp_path / "sub" / "org" / "name").mkdir(parents=True)   # base_dir (a recipe's folder) first
    assert resolve_reference("org/name", base_dir=tmp_path / "sub").path == tmp_path / "sub" / "org" / "name"
    with pytest.raises(SurgeryError, match=r"r.yaml: a recipe file, where a checkpoint \(a folder, a .safetensors "
                                           r"file or a Hub id\) is expected"):
        resolve_reference(recipe, kinds=CHECKPOINT)
    with pytest.raises(SurgeryError, match="checkpoint not found: 'dir/missing.yaml' is neither"):
        resolve_reference("dir/missing.yaml")   # a missing recipe file, not a Hub repository to download


@pytest.mark.parametrize("command", ["run", "diff", "eval", "probe", "diff-expert"])
def test_a_bad_reference_gets_the_same_message_from_every_command(demo_dir, tmp_path, command):
    ck = demo_dir / "checkpoints"
    text = tmp_path / "t.txt"
    text.write_text("habari ya asubuhi\nhello there\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs: {{a: {ck / 'math'}, b: ./nowhere/model}}\noperations: []\n")
    args = {"run": ["run", recipe, "-o", tmp_path / "out"], "diff": ["diff", "./nowhere/model", ck / "math"],
            "diff-expert": ["diff", ck / "base", "./nowhere/model"],
            "eval": ["eval", ck / "base", "./nowhere/model", "--data", f"t={text}"],
            "probe": ["probe", ck / "base", "./nowhere/model", "--text", f"sw={text}", "--text", f"en={text}"]}[command]
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: ") and MISSING in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    if command == "run":  # a recipe input names the file and the YAML path
        assert "r.yaml:1: inputs.b: " + MISSING in r.stderr


def test_a_recipe_where_a_checkpoint_is_expected(demo_dir, tmp_path):
    ck = demo_dir / "checkpoints"
    inner = swap_recipe(ck, tmp_path / "inner.yaml")
    outer = tmp_path / "outer.yaml"
    outer.write_text(f"inputs: {{a: {inner}}}\noperations: []\n")
    r = run_cli("run", outer, "-o", tmp_path / "out")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert f"inputs.a: {inner}: a recipe file, where a checkpoint" in r.stderr


# ---------------------------------------------------------------- load_model

def test_every_kind_of_reference_loads_the_same_bytes(demo_dir, tmp_path):
    """A recipe in memory == its written output; a lone .safetensors file == its folder; a Plan == its recipe."""
    ck = demo_dir / "checkpoints"
    recipe = swap_recipe(ck, tmp_path / "r.yaml")
    written = surgery.run(recipe, tmp_path / "out").output
    disk = load(written)
    _, base_tok = load_model(ck / "base")
    for ref in (recipe, surgery.build_plan(recipe), surgery.load_recipe(recipe), written,
                written / "model.safetensors"):
        model, tok = load_model(ref)
        state = model.state_dict()
        assert type(model).__name__ == "LlamaForCausalLM" and not model.training, ref
        assert all(raw_bytes(state[k]) == raw_bytes(v) for k, v in disk.items()), ref
        assert tok("habari ya").input_ids == base_tok("habari ya").input_ids
    as_float, _ = load_model(written / "model.safetensors", dtype="float32")
    assert as_float.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(as_float.model.embed_tokens.weight, disk["model.embed_tokens.weight"].float())


def test_load_model_refusals(demo_dir, tmp_path):
    ck = demo_dir / "checkpoints"
    with pytest.raises(SurgeryError, match="--dtype 'int8': expected float32, float16 or bfloat16"):
        load_model(ck / "base", dtype="int8")
    with pytest.raises(SurgeryError, match="cannot load a model from a int"):
        load_model(7)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((ck / "base" / "model.safetensors").read_bytes())
    with pytest.raises(SurgeryError, match=f"{bare}: no config.json"):
        load_model(bare / "model.safetensors")
    with pytest.raises(SurgeryError, match=f"{bare}: no config.json"):
        load_model(bare)
    (bare / "config.json").write_text((ck / "base" / "config.json").read_text())
    with pytest.raises(SurgeryError, match=f"{bare}: no tokenizer files"):
        load_model(bare)
    model, tok = load_model(bare, tokenizer=ck / "base")
    assert tok is load_model(ck / "base")[1]   # one tokenizer per folder, shared


def test_a_hub_id_loads_through_the_same_download_as_a_recipe_input(hub, files, demo_dir, tmp_path):  # noqa: F811
    folder = tmp_path / "local"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    want = load(folder)
    model, _ = load_model("org/tiny", tokenizer=demo_dir / "checkpoints" / "base")
    state = model.state_dict()
    assert all(raw_bytes(state[k]) == raw_bytes(v) for k, v in want.items())
    assert "pytorch_model.bin" not in hub.downloads and "optimizer.pt" not in hub.downloads


# ---------------------------------------------------------------- progress bars

BAR_COMMANDS = {
    "run": lambda ck, tmp: ["run", swap_recipe(ck, tmp / "r.yaml"), "-o", tmp / "out"],
    "diff": lambda ck, tmp: ["diff", ck / "base", ck / "math"],
    "eval": lambda ck, tmp: ["eval", ck / "base", swap_recipe(ck, tmp / "r.yaml"), "--data", f"t={_text(tmp)}"],
    "probe": lambda ck, tmp: ["probe", ck / "base", swap_recipe(ck, tmp / "r.yaml"), "--text", f"sw={_text(tmp)}",
                              "--text", f"en={_text(tmp, 'good morning to you all')}", "--no-probing"],
    "demo": lambda ck, tmp: ["demo", "--dir", tmp / "demo"],
    "mergekit": lambda ck, tmp: ["mergekit", _mergekit_config(ck, tmp), tmp / "merged"],
}
BARS = {"run": ["surgery run"], "diff": ["surgery diff"], "eval": ["Loading weights", "eval t"],
        "probe": ["Loading weights", "probe base"], "demo": ["surgery run", "Loading weights"],
        "mergekit": ["Warmup loader cache"]}


def _mergekit_config(ck, tmp):
    import shutil

    for name in ("math", "swahili"):  # mergekit needs `architectures` in config.json
        folder = shutil.copytree(ck / name, tmp / name)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {"architectures": ["LlamaForCausalLM"]}))
    path = tmp / "merge.yml"
    path.write_text(f"merge_method: linear\ndtype: bfloat16\nmodels:\n  - model: {tmp / 'math'}\n    parameters: "
                    f"{{weight: 0.5}}\n  - model: {tmp / 'swahili'}\n    parameters: {{weight: 0.5}}\n")
    return path


def _text(tmp, line="habari ya asubuhi rafiki"):
    path = tmp / f"{len(line)}.txt"
    path.write_text(f"{line}\n{line} tena\n{line} sana\n")
    return path


@pytest.mark.parametrize("command", sorted(BAR_COMMANDS))
def test_a_piped_run_draws_no_bar_and_a_terminal_gets_them(command, demo_dir, tmp_path, monkeypatch):
    """stderr into a pipe or a log: no bar, neither ours nor transformers' "Loading weights" nor the Hub's.
    On a terminal (as the rule sees it): ours and the libraries'; --quiet/--json: none. Afterwards the
    libraries' own settings are as they were."""
    from transformers.utils import logging as tf_logging

    from surgery.io import progress

    before = tf_logging.is_progress_bar_enabled()
    ck = demo_dir / "checkpoints"
    for sub in ("piped", "tty", "quiet"):
        (tmp_path / sub).mkdir()
    piped = run_cli(*BAR_COMMANDS[command](ck, tmp_path / "piped"))
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == "", piped.stderr
    monkeypatch.setattr(progress, "_terminal", lambda: True)
    tty = run_cli(*BAR_COMMANDS[command](ck, tmp_path / "tty"))
    assert tty.returncode == 0, tty.stderr
    assert all(bar in tty.stderr for bar in BARS[command]), tty.stderr
    quiet = run_cli(*BAR_COMMANDS[command](ck, tmp_path / "quiet"), "--quiet")  # mergekit's own option too
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert tf_logging.is_progress_bar_enabled() == before and progress._decided is None
