"""The fake Hub's HTTP endpoints (tests/fakehub.py describes them): a request handler bound to one FakeHub,
and the routing table from (method, path segments) to its methods."""

from __future__ import annotations

import base64
import hashlib
import json
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

from fakehub import LFS_THRESHOLD, Commit, Repo

if TYPE_CHECKING:
    from fakehub import FakeHub


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    # ---- plumbing ------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload=None, headers: dict | None = None):
        data = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        return self.hub.tokens.get(token) if token else None

    def _handle(self, method: str):
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        body = self._body()
        hub = self.hub
        with hub.lock:
            hub.requests.append((method, path))
            hub.bodies.append(body)
            hub.headers.append({k.lower(): v for k, v in self.headers.items()})
        if (method, path) == ("GET", "/api/agent-harnesses"):  # huggingface_hub's agent detection, no auth
            return self._send(200, {"standardEnvVars": [], "harnesses": {}})
        user = self._user()
        if hub.html_api and path.startswith("/api/"):
            return self._send_raw(200, b"<!doctype html><html><body>Sign in</body></html>", "text/html")
        anonymous_ok = method in ("GET", "HEAD") and (path.startswith("/api/models/") or "/resolve/" in path)
        if self.headers.get("Authorization") and user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        if user is None and not path.startswith("/lfs/") and not anonymous_ok:
            return self._error(401, "Invalid credentials in Authorization header")
        parts = [unquote(p) for p in path.strip("/").split("/")]
        for pattern, fn in ROUTES:
            if method == pattern[0] and _match(pattern[1:], parts):
                with hub.lock:
                    return fn(self, user, parts, query, body)
        return self._error(404, f"no route for {method} {path}")

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def _send_raw(self, status: int, data: bytes, content_type: str, headers: dict | None = None, body=True):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    # ---- helpers -------------------------------------------------------
    def _repo(self, user, repo_id, write: bool):
        repo = self.hub.repos.get(repo_id)
        if user is None and (repo is None or repo.private):  # the Hub hides private repos from anonymous users
            self._error(401, "Repository not found: invalid username or password", "RepoNotFound")
            return None
        if repo is None or (repo.private and repo_id.split("/")[0] not in self._namespaces(user)):
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        if write and repo_id.split("/")[0] not in self._namespaces(user):
            self._error(403, f"You don't have write access to {repo_id}")
            return None
        return repo

    def _namespaces(self, user) -> set[str]:
        return {user} | self.hub.orgs

    # ---- endpoints -----------------------------------------------------
    def create_repo(self, user, parts, query, body):
        payload = json.loads(body or b"{}")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if namespace not in self._namespaces(user):
            return self._error(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._send(409, {"error": "You already created this model repo", "url": url})
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        self.hub._create_repo(repo_id, private)
        return self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def repo_info(self, user, parts, query, body):
        repo_id = "/".join(parts[2:4])
        repo = self._repo(user, repo_id, write=False)
        if repo is None:
            return
        rev = parts[5] if len(parts) > 5 else "main"
        head = _commit(repo, rev)
        if head is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return self._send(200, {"id": repo_id, "sha": head.oid, "private": repo.private,
                                "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(head.files.items())]})

    def tree(self, user, parts, query, body):
        repo = self._repo(user, "/".join(parts[2:4]), write=False)
        if repo is None:
            return
        commit = _commit(repo, parts[5])
        if commit is None:
            return self._error(404, f"Invalid rev id: {parts[5]}", "RevisionNotFound")
        entries = []
        for path, data in sorted(commit.files.items()):
            entry = {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if path in commit.lfs:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return self._send(200, entries)

    def resolve(self, user, parts, query, body):
        repo_id, rev, path = "/".join(parts[0:2]), parts[3], "/".join(parts[4:])
        repo = self._repo(user, repo_id, write=False)
        if repo is None:
            return
        commit = _commit(repo, rev)
        if commit is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        if path not in commit.files:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound")
        data = commit.files[path]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        if path in commit.lfs:
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
        is_get = self.command == "GET"
        if is_get and path in self.hub.fail:
            return self._error(self.hub.fail[path], "Internal Error - We're working hard to fix this as soon as possible!")
        if is_get:
            self.hub.downloads.append(path)
        return self._send_raw(200, data, "application/octet-stream", headers, body=is_get)

    def validate_yaml(self, user, parts, query, body):
        return self._send(200, {"errors": [], "warnings": []})

    def preupload(self, user, parts, query, body):
        repo_id, rev = "/".join(parts[2:4]), parts[5]
        repo = self._repo(user, repo_id, write="create_pr" not in query)
        if repo is None:
            return
        if rev not in repo.branches:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        files = json.loads(body)["files"]
        modes = [{"path": f["path"], "shouldIgnore": False,
                  "uploadMode": "lfs" if f["path"].endswith(".safetensors") or f["size"] > LFS_THRESHOLD
                  else "regular"} for f in files]
        return self._send(200, {"files": modes, "commitOid": repo.branches[rev]})

    def lfs_batch(self, user, parts, query, body):
        repo_id = "/".join(parts[0:2])[: -len(".git")]
        if self._repo(user, repo_id, write=False) is None:
            return
        payload = json.loads(body)
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            if oid in self.hub.lfs_objects and oid in self.hub.verified:
                objects.append({"oid": oid, "size": size})  # already there: no actions
                continue
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": {"href": f"{self.hub.url}/lfs/{oid}", "header": {}},
                "verify": {"href": f"{self.hub.url}/lfs/{oid}/verify", "header": {}},
            }})
        return self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_put(self, user, parts, query, body):
        oid = parts[1]
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "sha256 of the uploaded bytes does not match the oid")
        self.hub.lfs_objects[oid] = body
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def lfs_verify(self, user, parts, query, body):
        oid = parts[1]
        payload = json.loads(body or b"{}")
        data = self.hub.lfs_objects.get(oid)
        if data is None or payload.get("oid") != oid or payload.get("size") != len(data):
            return self._error(400, "object not uploaded")
        self.hub.verified.add(oid)
        return self._send(200, {})

    def commit(self, user, parts, query, body):
        repo_id, rev = "/".join(parts[2:4]), parts[5]
        create_pr = "create_pr" in query
        repo = self._repo(user, repo_id, write=not create_pr)
        if repo is None:
            return
        if rev not in repo.branches:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return self._error(400, "the first NDJSON line must be the header")
        parent = repo.commits[repo.branches[rev]]
        files, lfs = dict(parent.files), set(parent.lfs)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.discard(value["path"])
            elif key == "lfsFile":
                oid = value["oid"]
                if oid not in self.hub.verified:
                    return self._error(400, f"LFS object {oid} was never uploaded")
                files[value["path"]] = self.hub.lfs_objects[oid]
                lfs.add(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                files = {p: b for p, b in files.items()
                         if p != value["path"] and not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                return self._error(400, f"unknown NDJSON key {key!r}")
        header = lines[0]["value"]
        oid = self.hub._new_oid()
        repo.commits[oid] = Commit(oid, parent.oid, header["summary"], header.get("description", ""), files, lfs)
        pr_url = None
        if create_pr:
            branch = f"refs/pr/{len(repo.pulls) + 1}"
            repo.pulls.append(branch)
            pr_url = f"{self.hub.url}/{repo_id}/discussions/{len(repo.pulls)}"
        else:
            branch = rev
        repo.branches[branch] = oid
        return self._send(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                "success": True, "pullRequestUrl": pr_url})

    def create_branch(self, user, parts, query, body):
        repo_id, branch = "/".join(parts[2:4]), parts[5]
        repo = self._repo(user, repo_id, write=True)
        if repo is None:
            return
        if branch in repo.branches:
            return self._error(409, f"Reference already exists: refs/heads/{branch}")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = repo.branches.get(start, start)
        return self._send(200, {})

    def whoami(self, user, parts, query, body):
        return self._send(200, {"type": "user", "name": user, "orgs": [{"name": o} for o in sorted(self.hub.orgs)]})


def _commit(repo: Repo, rev: str) -> Commit | None:
    """A branch name or a full commit oid."""
    oid = repo.branches.get(rev, rev)
    return repo.commits.get(oid)


def _match(pattern: tuple, parts: list[str]) -> bool:
    """Pattern items: a literal, '*' (one segment), '*.git' (a segment ending in .git)."""
    if len(pattern) != len(parts):
        return False
    for p, s in zip(pattern, parts):
        if p == "*.git":
            if not s.endswith(".git"):
                return False
        elif p != "*" and p != s:
            return False
    return True


# (method, *path segments) -> handler; repo ids are two segments, revisions one (quoted by the client)
ROUTES = [
    (("POST", "api", "repos", "create"), _Handler.create_repo),
    (("POST", "api", "validate-yaml"), _Handler.validate_yaml),
    (("GET", "api", "whoami-v2"), _Handler.whoami),
    (("GET", "api", "models", "*", "*"), _Handler.repo_info),
    (("GET", "api", "models", "*", "*", "revision", "*"), _Handler.repo_info),
    (("POST", "api", "models", "*", "*", "preupload", "*"), _Handler.preupload),
    (("POST", "api", "models", "*", "*", "commit", "*"), _Handler.commit),
    (("POST", "api", "models", "*", "*", "branch", "*"), _Handler.create_branch),
    (("POST", "*", "*.git", "info", "lfs", "objects", "batch"), _Handler.lfs_batch),
    (("PUT", "lfs", "*"), _Handler.lfs_put),
    (("GET", "api", "models", "*", "*", "tree", "*"), _Handler.tree),
    (("HEAD", "*", "*", "resolve", "*", "*"), _Handler.resolve),
    (("GET", "*", "*", "resolve", "*", "*"), _Handler.resolve),
    (("POST", "lfs", "*", "verify"), _Handler.lfs_verify),
]
