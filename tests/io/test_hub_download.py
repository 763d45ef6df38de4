"""Hub-id inputs downloaded over HTTP from the fake Hub (tests/fakehub.py): sharded models, only the
needed files, revisions, private repos, missing repos, server errors, HTML replies, and the token kept
out of every output. The CLI runs in-process (huggingface_hub's endpoint and cache are patched)."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner
from corpus import snapshot
from fakehub import FakeHub

from surgery.cli import cli

TOKEN = "hf_secret_download_token"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny llama in two shards (bytes by file name) plus files a run does not need."""
    from corpus import make_good
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("hubsrc")
    good = make_good(root / "good")
    state = load_file(str(good / "model.safetensors"))
    names = sorted(state)
    out = {"config.json": (good / "config.json").read_bytes(), "README.md": b"# tiny\n",
           "pytorch_model.bin": b"not needed", "optimizer.pt": b"not needed either"}
    weight_map = {}
    for i, part in enumerate([names[: len(names) // 2], names[len(names) // 2:]]):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, str(root / fname), metadata={"format": "pt"})
        out[fname] = (root / fname).read_bytes()
        weight_map.update({n: fname for n in part})
    out["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return out


@pytest.fixture
def hub(files, tmp_path, monkeypatch):
    from huggingface_hub import constants

    with FakeHub(tokens={TOKEN: "tester"}) as h:
        h.add_repo("org/tiny", files)
        h.add_repo("tester/private", files, private=True)
        monkeypatch.setattr(constants, "ENDPOINT", h.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            h.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "surgery-cache"))
        monkeypatch.chdir(tmp_path)
        yield h


def run(recipe_text, *args):
    from pathlib import Path

    Path("recipe.yaml").write_text(recipe_text)
    return CliRunner().invoke(cli, ["run", "recipe.yaml", "-o", "out", *args])


def test_sharded_download_fetches_only_needed_files_and_takes_lfs_hashes(hub, files, tmp_path):
    r = run("inputs: {m: org/tiny}\n")
    assert r.exit_code == 0, r.stderr
    assert sorted(hub.downloads) == ["config.json", "model-00001-of-00002.safetensors",
                                     "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    manifest = json.loads((tmp_path / "out" / "surgery_manifest.json").read_text())
    assert manifest["inputs"]["m"]["sha256"] == {f: hashlib.sha256(files[f]).hexdigest() for f in files
                                                 if f.endswith(".safetensors")}
    # taken from the cache's blob names, not hashed again: nothing was written to the hash cache
    assert not (tmp_path / "surgery-cache" / "sha256").exists()
    from helpers import load as load_dir
    from safetensors.torch import load

    expected = {}
    for f in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        expected.update(load(files[f]))
    got = load_dir(tmp_path / "out")
    assert set(got) == set(expected) and all(got[k].equal(expected[k]) for k in got)


def test_revision_is_downloaded(hub, files):
    config = json.loads(files["config.json"])
    config["rms_norm_eps"] = 0.125  # the branch differs in one config value
    hub.add_repo("org/tiny", {"config.json": json.dumps(config).encode()}, branch="v2")
    r = run("inputs: {m: org/tiny@v2}\n")
    assert r.exit_code == 0, r.stderr
    assert ("GET", "/api/models/org/tiny/revision/v2") in hub.requests
    manifest = json.loads(open("out/surgery_manifest.json").read())
    assert manifest["inputs"]["m"]["revision"] == "v2"
    assert json.loads(open("out/config.json").read())["rms_norm_eps"] == 0.125


def test_private_repo_with_token_and_token_absent_from_all_output(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    r = run("inputs: {m: tester/private}\n")
    assert r.exit_code == 0, r.stderr
    assert TOKEN not in r.output + r.stderr
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    r = run("inputs: {m: tester/nothing-here}\n", "--force")
    assert r.exit_code == 1 and TOKEN not in r.stderr


def _error(hub, recipe_text, *args):
    from pathlib import Path

    def state():
        return {k: v for k, v in snapshot(Path.cwd()).items()
                if not k.startswith(("hf-cache", "surgery-cache", "recipe.yaml"))}

    before = state()
    r = run(recipe_text, *args)
    assert state() == before  # no output, no parents, no temp dirs
    assert r.exit_code == 1, r.output
    assert r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def test_private_repo_without_token_is_401(hub):
    err = _error(hub, "inputs: {m: tester/private}\n")
    assert err == ("error: recipe.yaml:1: inputs.m: cannot fetch 'tester/private' from the Hub: 401: repository not "
                   "found, or private and the token (HF_TOKEN or `hf auth login`) does not grant access\n")


def test_missing_repo_and_missing_revision(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    err = _error(hub, "inputs: {m: org/absent}\n")
    assert err == ("error: recipe.yaml:1: inputs.m: cannot fetch 'org/absent' from the Hub: 404: repository not "
                   "found, or private and the token (HF_TOKEN or `hf auth login`) does not grant access\n")
    err = _error(hub, "inputs: {m: org/tiny@nope}\n")
    assert err == ("error: recipe.yaml:1: inputs.m: cannot fetch 'org/tiny@nope' from the Hub: 404: revision not "
                   "found in the repository\n")


def test_server_error_mid_download_is_one_line_and_leaves_nothing(hub):
    hub.fail["model-00002-of-00002.safetensors"] = 500
    err = _error(hub, "inputs: {m: org/tiny}\n")
    oid = hub.head("org/tiny").oid
    assert err == ("error: recipe.yaml:1: inputs.m: cannot fetch 'org/tiny' from the Hub: Server error '500 Internal "
                   f"Server Error' for url '{hub.url}/org/tiny/resolve/{oid}/model-00002-of-00002.safetensors'\n")
    assert "model-00001-of-00002.safetensors" in hub.downloads  # it failed part-way through


def test_html_reply_is_named(hub):
    hub.html_api = True
    err = _error(hub, "inputs: {m: org/tiny}\n")
    assert err == ("error: recipe.yaml:1: inputs.m: cannot fetch 'org/tiny' from the Hub: the server's reply is not "
                   "JSON (an HTML page? check HF_ENDPOINT)\n")


def test_python_api_hub_input(hub, files):
    from surgery.io.checkpoint import Checkpoint

    ck = Checkpoint.open("org/tiny")
    assert ck.from_hub and ck.file_hashes() == {f: hashlib.sha256(files[f]).hexdigest() for f in files
                                                if f.endswith(".safetensors")}
