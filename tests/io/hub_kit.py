"""Helpers of the Hub tests (test_hub.py, test_model_card.py): a `surgery` subprocess pointed at the fake Hub
(tests/fakehub.py), and checks that uploads are byte-identical and that the token leaks nowhere."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

from fakehub import FakeHub


ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_FAKEsecretTOKEN_4f9c2e7d"     # recognisable: must never show up in output or files
WRONG = "hf_WRONGsecretTOKEN_91ab0c33"    # unknown to the fake Hub: 401
USER = "tester"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_env(hub_url: str, hf_home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                        "HF_TOKEN_PATH", "HF_OIDC_RESOURCE")}
    env.update(HF_ENDPOINT=hub_url, HF_HUB_DISABLE_XET="1", HF_HOME=str(hf_home),
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra)
    return env


def surgery_cli(*args, env: dict, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgery", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def assert_token_absent(proc, *folders: Path, hub: FakeHub | None = None, token: str = TOKEN):
    """The token is in no output stream, no file written and nothing the Hub stored."""
    assert token not in proc.stdout and token not in proc.stderr
    for folder in folders:
        for f in folder.rglob("*"):
            if f.is_file() and f.name not in ("token", "stored_tokens"):  # the user's own login files
                assert token.encode() not in f.read_bytes(), f
    if hub is not None:
        for repo in hub.repos.values():
            for commit in repo.commits.values():
                assert token not in commit.summary and token not in commit.description
                assert all(token.encode() not in data for data in commit.files.values())


def assert_uploaded(hub: FakeHub, repo_id: str, folder: Path, rev: str = "main"):
    """Every file of ``folder`` is on ``rev`` byte-identical; safetensors (only) went through LFS."""
    remote = hub.files(repo_id, rev)
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert set(local) <= set(remote)
    for path, data in local.items():
        assert sha(remote[path]) == sha(data), path
    shards = {p for p in local if p.endswith(".safetensors")}
    assert shards and hub.lfs_paths(repo_id, rev) == shards
    # and the bytes really travelled through the LFS endpoints
    for path in shards:
        assert hub.lfs_objects[sha(local[path])] == local[path]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


