"""`surgery push` and `surgery run --push-to`, against a real HTTP server (tests/fakehub.py).

CLI tests run `python -m surgery` in a subprocess with HF_ENDPOINT pointing at the fake Hub,
HF_HUB_DISABLE_XET=1 (legacy LFS uploads), HF_HUB_OFFLINE unset and HF_HOME in a temp folder. The model
card: test_model_card.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
from fakehub import FakeHub
from hub_kit import TOKEN, USER, WRONG, assert_token_absent, assert_uploaded, closed_port, make_env, surgery_cli


@pytest.fixture
def hub():
    with FakeHub(tokens={TOKEN: USER}) as h:
        yield h


# ---------------------------------------------------------------------------- pushing

def test_push_uploads_everything_in_one_private_commit(output, hub, hf_home):
    env = make_env(hub.url, hf_home, HF_TOKEN=TOKEN)
    proc = surgery_cli("push", output, f"{USER}/swapped", env=env)
    assert proc.returncode == 0, proc.stderr
    repo_id = f"{USER}/swapped"
    assert_uploaded(hub, repo_id, output)
    assert hub.repos[repo_id].private is True
    assert hub.commit_count(repo_id) == 2  # the repo's initial commit + ours: one commit for all files
    head = hub.head(repo_id)
    assert head.summary == "Upload layer_swap of task, lang (surgery 0.1.0)"
    assert "task expert with the language expert's outer layers" in head.description
    assert f"pushed {len(list(output.iterdir()))} files" in proc.stdout and "(private, branch main)" in proc.stdout
    assert head.oid in proc.stdout
    # every request carried the token as a bearer header, and only there
    assert all(h.get("authorization") == f"Bearer {TOKEN}" for (m, p), h in zip(hub.requests, hub.headers)
               if p.startswith("/api/") and p != "/api/agent-harnesses")
    assert not any(TOKEN.encode() in body for body in hub.bodies)
    assert_token_absent(proc, output, hf_home, hub=hub)


def test_public_with_token_option_and_json(output, hub, hf_home):
    proc = surgery_cli("push", output, f"{USER}/open", "--public", "--token", TOKEN, "--json",
                       env=make_env(hub.url, hf_home))
    assert proc.returncode == 0, proc.stderr
    assert hub.repos[f"{USER}/open"].private is False
    data = json.loads(proc.stdout)
    assert data["repo_id"] == f"{USER}/open" and data["private"] is False and data["revision"] == "main"
    assert data["commit_oid"] == hub.head(f"{USER}/open").oid
    assert data["commit_url"].startswith(hub.url)
    assert {f["path"]: f["size"] for f in data["files"]} == {p.name: p.stat().st_size for p in output.iterdir()}
    assert_token_absent(proc, output, hf_home, hub=hub)


def test_token_from_login_file(output, hub, hf_home):
    (hf_home / "token").write_text(TOKEN)  # what `hf auth login` writes
    proc = surgery_cli("push", output, f"{USER}/from-login", env=make_env(hub.url, hf_home))
    assert proc.returncode == 0, proc.stderr
    assert_uploaded(hub, f"{USER}/from-login", output)
    assert_token_absent(proc, output, hf_home, hub=hub)


def test_token_option_wins_over_env(output, hub, hf_home):
    proc = surgery_cli("push", output, f"{USER}/prio", "--token", TOKEN,
                       env=make_env(hub.url, hf_home, HF_TOKEN=WRONG))
    assert proc.returncode == 0, proc.stderr
    assert_token_absent(proc, output, hf_home, hub=hub)
    assert_token_absent(proc, output, hf_home, hub=hub, token=WRONG)


def test_revision_push_lands_on_that_branch(output, hub, hf_home):
    env = make_env(hub.url, hf_home, HF_TOKEN=TOKEN)
    repo_id = f"{USER}/branched"
    proc = surgery_cli("push", output, repo_id, "--revision", "v2-swap", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "branch v2-swap" in proc.stdout
    assert_uploaded(hub, repo_id, output, rev="v2-swap")
    assert set(hub.files(repo_id, "main")) == {".gitattributes"}  # main untouched
    # the branch exists now: a second push to it adds a commit on it
    proc = surgery_cli("push", output, repo_id, "--revision", "v2-swap", env=env)
    assert proc.returncode == 0, proc.stderr
    assert hub.commit_count(repo_id, "v2-swap") == 3
    assert_token_absent(proc, output, hf_home, hub=hub)


def test_second_push_to_existing_repo(output, hub, hf_home, tmp_path):
    env = make_env(hub.url, hf_home, HF_TOKEN=TOKEN)
    repo_id = f"{USER}/twice"
    assert surgery_cli("push", output, repo_id, env=env).returncode == 0
    # a changed output: new card text, same weights (the LFS objects are already there)
    second = tmp_path / "second"
    shutil.copytree(output, second)
    (second / "README.md").write_text((output / "README.md").read_text() + "\nSecond version.\n")
    n_puts = sum(m == "PUT" for m, _ in hub.requests)
    proc = surgery_cli("push", second, repo_id, "--public", env=env)
    assert proc.returncode == 0, proc.stderr
    assert hub.commit_count(repo_id) == 3
    assert hub.files(repo_id)["README.md"].endswith(b"Second version.\n")
    assert_uploaded(hub, repo_id, second)
    assert sum(m == "PUT" for m, _ in hub.requests) == n_puts  # no weight bytes sent twice
    assert hub.repos[repo_id].private is True  # an existing repo keeps its visibility
    assert_token_absent(proc, second, hf_home, hub=hub)


def test_dry_run_lists_files_and_uploads_nothing(output, hub, hf_home):
    proc = surgery_cli("push", output, f"{USER}/dry", "--dry-run", env=make_env(hub.url, hf_home))  # no token needed
    assert proc.returncode == 0, proc.stderr
    assert hub.requests == [] and hub.repos == {}
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"dry run: would push {len(list(output.iterdir()))} files")
    for f in output.iterdir():
        assert any(line.split()[0] == f.name for line in lines[1:-1]), f.name
    from surgery.io.output import format_size as _size

    shard = next(output.glob("*.safetensors"))
    assert any(line.split()[0] == shard.name and line.endswith(_size(shard.stat().st_size)) for line in lines)
    proc = surgery_cli("push", output, f"{USER}/dry", "--dry-run", "--json", env=make_env(hub.url, hf_home))
    data = json.loads(proc.stdout)
    assert data["dry_run"] is True and data["commit_url"] is None
    assert data["total_bytes"] == sum(f.stat().st_size for f in output.iterdir())
    assert hub.requests == []


def test_create_pr(output, hub, hf_home):
    env = make_env(hub.url, hf_home, HF_TOKEN=TOKEN)
    repo_id = f"{USER}/with-pr"
    assert surgery_cli("push", output, repo_id, env=env).returncode == 0
    main_before = hub.head(repo_id).oid
    proc = surgery_cli("push", output, repo_id, "--create-pr", env=env)
    assert proc.returncode == 0, proc.stderr
    assert hub.head(repo_id).oid == main_before
    assert hub.repos[repo_id].pulls == ["refs/pr/1"]
    assert_uploaded(hub, repo_id, output, rev="refs/pr/1")
    assert f"pull request: {hub.url}/{repo_id}/discussions/1" in proc.stdout


def test_run_push_to(family, hub, hf_home, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"inputs:\n  task: {family['task']}\n  lang: {family['lang']}\nrecipient: task\n"
                      "operations:\n  - take:\n      from: lang\n      select: {layers: '0-1'}\n")
    out = tmp_path / "out"
    env = make_env(hub.url, hf_home, HF_TOKEN=TOKEN)
    proc = surgery_cli("run", recipe, "-o", out, "--push-to", f"{USER}/ran", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert "README.md" in data["files"] and data["push"]["repo_id"] == f"{USER}/ran"
    assert_uploaded(hub, f"{USER}/ran", out)
    assert hub.repos[f"{USER}/ran"].private is True
    assert_token_absent(proc, out, hf_home, hub=hub)


def test_run_push_to_checks_token_before_running(family, hub, hf_home, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"inputs:\n  task: {family['task']}\n")
    out = tmp_path / "out"
    proc = surgery_cli("run", recipe, "-o", out, "--push-to", f"{USER}/never", env=make_env(hub.url, hf_home))
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: no Hugging Face token")
    assert not out.exists() and hub.requests == []


def test_run_push_failure_says_output_is_written(family, hf_home, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"inputs:\n  task: {family['task']}\n")
    out = tmp_path / "out"
    proc = surgery_cli("run", recipe, "-o", out, "-q", "--push-to", f"{USER}/x", "--token", TOKEN,
                       env=make_env(f"http://127.0.0.1:{closed_port()}", hf_home))
    assert proc.returncode == 1
    assert (out / "README.md").is_file()
    line = proc.stderr.strip()
    assert line.startswith("error: cannot connect to the Hub") and f"surgery push {out.resolve()} {USER}/x" in line
    assert_token_absent(proc, out, hf_home)


# ---------------------------------------------------------------------------- errors: one clean line, exit 1

@pytest.mark.parametrize("case", ["no-token", "401", "missing-repo", "no-write-access", "refused"])
def test_errors_are_one_clean_line(case, output, hub, hf_home):
    endpoint, args, extra = hub.url, [f"{USER}/errs"], {"HF_TOKEN": TOKEN}
    if case == "no-token":
        extra = {}
        expected = "error: no Hugging Face token: pass --token, set HF_TOKEN, or log in with `hf auth login`"
    elif case == "401":
        extra = {"HF_TOKEN": WRONG}
        expected = f"error: the Hub at {hub.url} rejected the token (401 Unauthorized)"
    elif case == "missing-repo":
        args = [f"{USER}/absent", "--create-pr"]
        expected = f"error: repository '{USER}/absent' not found at {hub.url}"
    elif case == "no-write-access":
        args = ["someone-else/model"]
        expected = "error: no write access to 'someone-else/model' with this token (403 Forbidden)"
    else:
        endpoint = f"http://127.0.0.1:{closed_port()}"
        expected = f"error: cannot connect to the Hub at {endpoint}:"
    proc = surgery_cli("push", output, *args, env=make_env(endpoint, hf_home, **extra))
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    assert "Traceback" not in proc.stderr
    assert_token_absent(proc, output, hf_home, hub=hub)
    assert_token_absent(proc, output, hf_home, hub=hub, token=WRONG)
    assert hub.repos == {}


def test_refuses_incomplete_outputs(output, hub, hf_home, tmp_path):
    env = make_env(hub.url, hf_home, HF_TOKEN=TOKEN)
    no_manifest = tmp_path / "no_manifest"
    shutil.copytree(output, no_manifest)
    (no_manifest / "surgery_manifest.json").unlink()
    no_weights = tmp_path / "no_weights"
    shutil.copytree(output, no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    one_shard_gone = tmp_path / "one_shard_gone"
    shutil.copytree(output, one_shard_gone)
    gone = sorted(one_shard_gone.glob("*.safetensors"))[0]
    gone.unlink()
    cases = [(no_manifest, f"error: {no_manifest}: no surgery_manifest.json, so not a complete `surgery run` output"),
             (no_weights, f"error: {no_weights}: no .safetensors weights, so not a complete `surgery run` output"),
             (one_shard_gone, f"error: {one_shard_gone}: the manifest lists shard(s) that are missing: {gone.name}"),
             (tmp_path / "nowhere", "error: ")]
    for folder, expected in cases:
        proc = surgery_cli("push", folder, f"{USER}/incomplete", env=env)
        assert proc.returncode in (1, 2) and proc.stderr.strip().splitlines()[-1].startswith(expected), proc.stderr
    assert hub.requests == []


def test_bad_options(output, hub, hf_home):
    env = make_env(hub.url, hf_home, HF_TOKEN=TOKEN)
    proc = surgery_cli("push", output, f"{USER}/x", "--create-pr", "--revision", "dev", env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: --create-pr opens a pull request against main; it cannot be combined "
                                   "with --revision 'dev'")
    proc = surgery_cli("push", output, "not a repo!", env=env)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: 'not a repo!' is not a valid repo id")
    assert hub.requests == []


# ---------------------------------------------------------------------------- Python API

@pytest.fixture
def in_process(hub, monkeypatch, hf_home):
    """huggingface_hub reads these at import; the endpoint itself must be read by surgery at call time."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    return hub


def test_python_push(output, in_process):
    import surgery

    hub = in_process
    result = surgery.push(output, f"{USER}/api", token=TOKEN, private=False, commit_message="my message")
    assert result.endpoint == hub.url and result.commit_url.startswith(hub.url)
    assert result.repo_id == f"{USER}/api" and result.commit_oid == hub.head(f"{USER}/api").oid
    assert hub.head(f"{USER}/api").summary == "my message"
    assert hub.repos[f"{USER}/api"].private is False
    assert_uploaded(hub, f"{USER}/api", output)
    assert TOKEN not in json.dumps(result.to_dict()) and TOKEN not in repr(result)


def test_python_push_errors(output, in_process):
    import surgery

    with pytest.raises(surgery.SurgeryError, match="^no Hugging Face token"):
        surgery.push(output, f"{USER}/api")
    with pytest.raises(surgery.SurgeryError, match=r"rejected the token \(401") as info:
        surgery.push(output, f"{USER}/api", token=WRONG)
    assert WRONG not in str(info.value)
    dry = surgery.push(output, f"{USER}/api", dry_run=True)
    assert dry.dry_run and dry.commit_url is None and in_process.repos == {}


