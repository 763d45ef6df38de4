"""A small fake Hugging Face Hub on 127.0.0.1 for push tests (stdlib http.server in a thread).

    with FakeHub(tokens={"hf_secret": "tester"}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        ...push...
        hub.files("tester/model")          # {path: bytes} at the head of main
        hub.lfs_paths("tester/model")      # paths committed as LFS pointers
        hub.repos["tester/model"].private

It answers the requests huggingface_hub 2.x makes for create_repo, create_branch, repo_info and
upload_folder over the legacy LFS protocol (tests set HF_HUB_DISABLE_XET=1):

    POST /api/repos/create                              409 with {"url"} when the repo exists
    GET  /api/models/{repo}[/revision/{rev}]            repo_info; 404 RepoNotFound / RevisionNotFound
    POST /api/validate-yaml                             {"errors": [], "warnings": []}
    POST /api/models/{repo}/preupload/{rev}             uploadMode lfs for *.safetensors and big files
    POST /{repo}.git/info/lfs/objects/batch             transfer basic, upload + verify actions
    PUT  /lfs/{oid}                                     stores the bytes (sha256 checked)
    POST /lfs/{oid}/verify                              confirms the object
    POST /api/models/{repo}/commit/{rev}                NDJSON header / file (base64) / lfsFile / deletedFile
    POST /api/models/{repo}/branch/{branch}             creates a branch (409 when it exists)
    GET  /api/whoami-v2                                 the token's user
    GET  /api/agent-harnesses                           empty registry (huggingface_hub asks, unauthenticated)
    HEAD /{repo}/resolve/{rev}/{file}                   file metadata for snapshot_download: X-Repo-Commit, ETag,
                                                        and for LFS files X-Linked-Etag (sha256) / X-Linked-Size
    GET  /{repo}/resolve/{rev}/{file}                   the file's bytes
    GET  /api/models/{repo}/tree/{rev}                  the file list (with LFS sha256) snapshot_download reads

Downloads: ``hub.add_repo("org/model", {"model.safetensors": b"..."}, private=False)`` makes a repo with one
commit (``branch=`` adds a branch). Public repos answer without a token; a private one answers 401 to
anonymous requests, as the Hub does. ``hub.fail[path] = 500`` makes GETs of that file fail;
``hub.html_api = True`` answers the API with an HTML page. ``hub.downloads`` lists the files fetched.

Authorization is ``Bearer <token>``; unknown or missing tokens get the Hub's 401. A user may write
to its own namespace and to ``orgs``; creating elsewhere gets 403.

This module holds the Hub's state and lifecycle; the HTTP endpoints are in fakehub_handler.py.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

LFS_THRESHOLD = 10 * 1024 * 1024
INITIAL_FILES = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    description: str
    files: dict[str, bytes]          # full snapshot: path -> content
    lfs: set[str]                    # paths stored through LFS


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)   # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    pulls: list[str] = field(default_factory=list)           # refs/pr/N branch names


class FakeHub:
    def __init__(self, tokens: dict[str, str] | None = None, orgs: tuple[str, ...] = ("surgery-org",)):
        self.tokens = dict(tokens or {})
        self.orgs = set(orgs)
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}    # oid -> bytes, after PUT
        self.verified: set[str] = set()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.bodies: list[bytes] = []              # every request body, to search for leaked secrets
        self.headers: list[dict] = []              # every request's headers, lower-case names
        self.lock = threading.Lock()
        self.fail: dict[str, int] = {}            # file path -> status its GETs answer
        self.html_api = False
        self.downloads: list[str] = []             # paths of the files sent by GET resolve
        self._server: ThreadingHTTPServer | None = None
        self._counter = 0

    # ---- lifecycle -----------------------------------------------------
    def __enter__(self) -> "FakeHub":
        from fakehub_handler import _Handler  # it imports this module's Commit

        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ---- inspection ----------------------------------------------------
    def head(self, repo_id: str, rev: str = "main") -> Commit:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[rev]]

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        return dict(self.head(repo_id, rev).files)

    def lfs_paths(self, repo_id: str, rev: str = "main") -> set[str]:
        return set(self.head(repo_id, rev).lfs)

    def commit_count(self, repo_id: str, rev: str = "main") -> int:
        repo, n, oid = self.repos[repo_id], 0, self.repos[repo_id].branches[rev]
        while oid is not None:
            n, oid = n + 1, repo.commits[oid].parent
        return n

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False, branch: str = "main") -> str:
        """Create (or extend) a repo with one commit holding ``files`` on ``branch``; return the commit oid."""
        with self.lock:
            repo = self.repos.get(repo_id) or self._create_repo(repo_id, private)
            parent = repo.branches.get(branch, repo.branches["main"])
            oid = self._new_oid()
            snapshot = {**repo.commits[parent].files, **files}
            lfs = {p for p in snapshot if p.endswith(".safetensors") or len(snapshot[p]) > LFS_THRESHOLD}
            repo.commits[oid] = Commit(oid, parent, f"add {len(files)} files", "", snapshot, lfs)
            repo.branches[branch] = oid
            return oid

    # ---- state changes (called by the handler, under the lock) ---------
    def _new_oid(self) -> str:
        self._counter += 1
        return hashlib.sha1(f"commit-{self._counter}".encode()).hexdigest()

    def _create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private)
        oid = self._new_oid()
        repo.commits[oid] = Commit(oid, None, "initial commit", "", dict(INITIAL_FILES), set())
        repo.branches["main"] = oid
        self.repos[repo_id] = repo
        return repo
