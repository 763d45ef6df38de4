"""Publish a `surgery run` output on the Hugging Face Hub.

    result = push("out/merged", "me/merged-model")                # private repo, one commit on main
    result = push("out/merged", "me/merged-model", dry_run=True)  # list files and sizes, upload nothing
    print(result.commit_url)

The token comes from ``token=``, else ``HF_TOKEN``, else the ``hf auth login`` token file. It is only
ever handed to huggingface_hub's HfApi: never printed, logged or written anywhere. The endpoint is
read from ``HF_ENDPOINT`` when ``push`` is called (huggingface_hub itself reads it once, at import).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.io.output import MARKER_NAME, format_size

DEFAULT_ENDPOINT = "https://huggingface.co"
MANIFEST_NAME = "surgery_manifest.json"  # same as execute.MANIFEST_NAME (not imported: it pulls torch)
RECIPE_NAME = "surgery_recipe.yaml"


@dataclass
class PushResult:
    repo_id: str
    endpoint: str
    revision: str                     # branch the commit went to (or the PR's base branch)
    private: bool                     # visibility asked for (a repo that already existed keeps its own)
    files: list[tuple[str, int]]      # (path in repo, size in bytes), what was (or would be) uploaded
    commit_message: str
    dry_run: bool = False
    url: str | None = None            # the repo's page
    commit_url: str | None = None
    commit_oid: str | None = None
    pr_url: str | None = None
    pull_request: bool = False         # a pull request was asked for instead of a commit on the branch

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = [{"path": p, "size": s} for p, s in self.files]
        d["total_bytes"] = self.total_bytes
        return d


def push(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = True,
         revision: str | None = None, create_pr: bool = False, dry_run: bool = False,
         commit_message: str | None = None) -> PushResult:
    """Upload the surgery output ``folder`` to the model repo ``repo_id`` in one commit.

    The repo is created if missing (private unless ``private=False``). ``revision`` names a branch,
    created from main if missing; ``create_pr`` opens a pull request against main instead of
    committing to it (the repo must exist). ``dry_run`` checks the folder and lists the files
    without contacting the Hub.
    """
    folder = Path(folder)
    manifest = check_output(folder)
    check_push_args(repo_id, revision=revision, create_pr=create_pr)
    files = list_upload_files(folder)
    summary, description = commit_text(folder, manifest, files)
    result = PushResult(repo_id=repo_id, endpoint=hub_endpoint(), revision=revision or "main", private=private,
                        files=files, commit_message=commit_message or summary, dry_run=dry_run,
                        pull_request=create_pr)
    if dry_run:
        return result

    from huggingface_hub import HfApi

    from surgery import __version__

    token = resolve_token(token)
    api = HfApi(endpoint=result.endpoint, token=token, library_name="surgery", library_version=__version__)
    from surgery.io.progress import library_bars

    with hub_errors(result, token), library_bars():  # upload bars: the one rule (surgery.io.progress)
        if create_pr:
            api.repo_info(repo_id, repo_type="model")  # a pull request needs an existing repo
            result.url = f"{result.endpoint}/{repo_id}"
        else:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            result.repo_id, result.url = url.repo_id or repo_id, str(url)
        if revision and revision != "main":
            api.create_branch(result.repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=folder, repo_id=result.repo_id, repo_type="model", revision=revision,
                                 create_pr=create_pr, commit_message=result.commit_message,
                                 commit_description=description, ignore_patterns=[MARKER_NAME])
    result.commit_url, result.commit_oid, result.pr_url = info.commit_url, info.oid, info.pr_url
    return result


# ---------------------------------------------------------------------------- checks and listing

def check_output(folder: Path) -> dict:
    """Refuse anything that is not a complete `surgery run` output or a surgery adapter; return its manifest."""
    if not folder.is_dir():
        raise SurgeryError(f"{folder}: not a directory (expected the output folder of `surgery run`)")
    if (folder / ADAPTER_CONFIG).is_file():
        return check_adapter(folder)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise SurgeryError(f"{folder}: no {MANIFEST_NAME}, so not a complete `surgery run` output; "
                           "push only folders that `surgery run` wrote")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        raise SurgeryError(f"{manifest_path}: not valid JSON; the output looks damaged, run it again") from None
    shards = (manifest.get("output") or {}).get("shards") or []
    if not any(folder.glob("*.safetensors")):
        raise SurgeryError(f"{folder}: no .safetensors weights, so not a complete `surgery run` output")
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise SurgeryError(f"{folder}: the manifest lists shard(s) that are missing: {', '.join(missing)}")
    return manifest


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_REPORTS = ("surgery_extract.json", "surgery_adapter.json")  # written by extract-lora, adamergex


def check_adapter(folder: Path) -> dict:
    """An adapter folder surgery wrote (`extract-lora`, `adamergex`): its facts in the manifest's shape."""
    report = next((folder / n for n in ADAPTER_REPORTS if (folder / n).is_file()), None)
    if report is None:
        raise SurgeryError(f"{folder}: an adapter folder without {' or '.join(ADAPTER_REPORTS)}, so not one "
                           "surgery wrote; push only folders surgery wrote")
    if not (folder / "adapter_model.safetensors").is_file():
        raise SurgeryError(f"{folder}: no adapter_model.safetensors, so not a complete adapter")
    try:
        config, made = json.loads((folder / ADAPTER_CONFIG).read_text()), json.loads(report.read_text())
    except ValueError as e:
        raise SurgeryError(f"{folder}: adapter_config.json or {report.name} is not valid JSON ({e})") from None
    return {"adapter": config.get("peft_type", "adapter"), "method": made.get("method"),
            "base": config.get("base_model_name_or_path"), "task_type": config.get("task_type"),
            "report": report.name}


def check_push_args(repo_id: str, *, revision: str | None = None, create_pr: bool = False) -> None:
    """Option checks that need no folder and no network (`surgery run --push-to` runs them first)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise SurgeryError(f"{repo_id!r} is not a valid repo id (expected 'name' or 'namespace/name', "
                           "letters, digits, '-', '_' and '.')") from None
    if create_pr and revision not in (None, "main"):
        raise SurgeryError("--create-pr opens a pull request against main; it cannot be combined with "
                           f"--revision {revision!r}")


def list_upload_files(folder: Path) -> list[tuple[str, int]]:
    """The files upload_folder will send (same ignore rules; the local output marker stays local), with sizes."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    paths = {p.relative_to(folder).as_posix(): p for p in sorted(folder.glob("**/*")) if p.is_file()}
    kept = filter_repo_objects(list(paths), ignore_patterns=[*DEFAULT_IGNORE_PATTERNS, MARKER_NAME])
    return [(rel, paths[rel].stat().st_size) for rel in kept]


def commit_text(folder: Path, manifest: dict, files: list[tuple[str, int]]) -> tuple[str, str]:
    """A commit summary and description from the manifest and recipe."""
    if manifest.get("adapter"):
        what = {"svd": "extract-lora", "adamergex": "adamergex"}.get(manifest.get("method"), manifest.get("method"))
        summary = f"Upload {manifest['adapter']} adapter ({what}) for {manifest.get('base')} (surgery)"
        return summary, "\n".join([f"- base: {manifest.get('base')}, task type {manifest.get('task_type')}",
                                   f"- {len(files)} files; how it was made: {manifest['report']}"])
    ops = []
    recipe_path = folder / RECIPE_NAME
    if recipe_path.is_file():
        import yaml

        try:
            recipe = yaml.safe_load(recipe_path.read_text()) or {}
            ops = [next(iter(op)) for op in recipe.get("operations") or [] if isinstance(op, dict) and op]
        except yaml.YAMLError:
            pass
    inputs = list((manifest.get("inputs") or {}))
    what = ", ".join(dict.fromkeys(ops)) or "copy"
    summary = f"Upload {what} of {', '.join(inputs) or 'inputs'} (surgery {manifest.get('version', '?')})"
    out = manifest.get("output") or {}
    lines = [manifest["description"].strip(), ""] if manifest.get("description") else []
    for name, info in (manifest.get("inputs") or {}).items():
        lines.append(f"- input {name}: {info.get('ref')}")
    lines.append(f"- output: {out.get('num_tensors', '?')} tensors, {format_size(out.get('total_bytes') or 0)}, "
                 f"dtype {out.get('dtype', '?')}, {len(files)} files")
    lines.append(f"- made {manifest.get('created', '?')}; recipe in {RECIPE_NAME}, provenance in {MANIFEST_NAME}")
    return summary, "\n".join(lines)


# ---------------------------------------------------------------------------- token, endpoint, errors

def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def resolve_token(token: str | None = None) -> str:
    """--token, then HF_TOKEN, then the token file of `hf auth login`."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise SurgeryError("no Hugging Face token: pass --token, set HF_TOKEN, or log in with `hf auth login` "
                           "(the token needs write access)")
    return found


@contextmanager
def hub_errors(result: PushResult, token: str):
    """Turn huggingface_hub / network failures into one SurgeryError line, with the token scrubbed."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RevisionNotFoundError

    repo, endpoint = result.repo_id, result.endpoint
    try:
        yield
    except SurgeryError:
        raise
    except Exception as top:  # noqa: BLE001 - every failure becomes one line
        e = _root_cause(top, HfHubHTTPError)
        if isinstance(e, HfHubHTTPError):
            status = e.response.status_code if e.response is not None else None
            server = _first_line(e.server_message or "")
            if status == 401:
                msg = (f"the Hub at {endpoint} rejected the token (401 Unauthorized); check --token, HF_TOKEN "
                       "or `hf auth login`")
            elif status == 403:
                msg = f"no write access to {repo!r} with this token (403 Forbidden)" + (f": {server}" if server else "")
            elif isinstance(e, RevisionNotFoundError):
                msg = f"branch {result.revision!r} not found in {repo!r} at {endpoint}"
            elif status == 404:
                msg = f"repository {repo!r} not found at {endpoint} (or this token cannot see it)"
                if result.pull_request:
                    msg += "; --create-pr needs an existing repo"
            else:
                request = e.response.request if e.response is not None else None
                where = f" to {request.method} {request.url.path}" if request is not None else ""
                msg = f"the Hub at {endpoint} answered {status}{where}" + (f": {server}" if server else "")
        elif isinstance(e, OfflineModeIsEnabled):
            msg = "offline mode is on (HF_HUB_OFFLINE=1); unset it to push"
        elif _is_transport_error(e):
            reason = _first_line(str(e)) or type(e).__name__
            msg = f"cannot connect to the Hub at {endpoint}: {reason}"
        else:
            msg = f"push to {repo!r} failed: {_first_line(str(top)) or type(top).__name__}"
        raise SurgeryError(msg.replace(token, "***") if token else msg) from None


def _root_cause(e: BaseException, http_error: type) -> BaseException:
    """The HTTP or transport error behind wrappers (huggingface_hub wraps LFS failures in RuntimeError)."""
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, http_error) or _is_transport_error(cur):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return e


def _is_transport_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"TransportError", "ConnectionError", "ConnectError", "RequestError"}) \
        or isinstance(e, (ConnectionError, TimeoutError))


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0].strip() if text else ""

