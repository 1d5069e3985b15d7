"""The one place patchlab talks to the Hugging Face Hub, through ``huggingface_hub.HfApi`` (never raw HTTP).

What is here (bytes and metadata only; choices such as what to push and what to record live in the registry):

- ``resolve_revision``: a branch, tag or (short) sha -> the full commit sha, checked against the Hub.
- ``download_checkpoint``: what a checkpoint needs (config, generation config, tokenizer files, safetensors and
  their index) of one commit, into the Hugging Face cache; offline it uses the cache or fails with one line.
- ``download_folder``: a whole repo revision into a destination directory, atomically (for ``pull``).
- ``push_folder``: a local folder (and optionally a model card) as ONE commit, idempotent, with optimistic
  concurrency on the branch head.
- ``build_model_card``: a ``ModelCard`` with patchlab's metadata (never validated against the public Hub).

Facts about the client this relies on (huggingface_hub 2.4, read from its source):

- ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and ``HF_HUB_DISABLE_XET`` are read once, at import. The endpoint is therefore
  a parameter here (default: the library's), and offline mode is also read from the environment at call time.
- ``upload_folder`` streams large folders as several commits when ``hf_xet`` is installed; ``create_commit`` always
  makes one, so pushes go through ``create_commit``.
- ``create_commit`` skips an empty commit and returns the current head: a push compares the remote files first
  (``model_info(files_metadata=True)``: git blob sha1 for regular files, sha256 for LFS files), makes no commit
  when nothing differs, and falls back to comparing the returned oid with the head it started from.
- Downloads of one file resume within a call after a dropped connection (HTTP Range); across calls completed files
  are reused from the cache, a half-downloaded file is started again (the client deletes its temporary file).
- ``ModelCard.validate()`` posts to the public Hub whatever the endpoint: never called here; the Hub checks the
  card's metadata itself when README.md is committed.

Errors from the client are mapped to the ``Hub*`` exceptions of ``patchlab.errors`` with one-line messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import huggingface_hub
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    snapshot_download,
)
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    BadRequestError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)
from huggingface_hub.utils import tqdm as hf_tqdm
from huggingface_hub.utils import validate_repo_id as _hf_validate_repo_id

from patchlab.errors import (
    CheckpointNotFoundError,
    HubAuthError,
    HubCardRejectedError,
    HubConnectionError,
    HubDownloadError,
    HubError,
    HubFileNotFoundError,
    HubOfflineError,
    HubPushSourceError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    HubServerError,
    InvalidRepoIdError,
    OutputExistsError,
    RemoteHeadMovedError,
)

__all__ = [
    "CHECKPOINT_PATTERNS",
    "CardEval",
    "PushResult",
    "PulledFolder",
    "build_model_card",
    "cached_checkpoint",
    "card_metadata",
    "default_endpoint",
    "download_checkpoint",
    "download_folder",
    "push_folder",
    "resolve_revision",
    "validate_repo_id",
]

# What a checkpoint needs; only top-level files (subfolders such as ``original/`` hold other formats).
CHECKPOINT_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
    "*.safetensors",
    "model.safetensors.index.json",
)
_SUBFOLDERS = ("*/*",)
GITATTRIBUTES = ".gitattributes"
Relation = Literal["adapter", "merge", "finetune", "quantized"]


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exception classes of whichever HTTP library the installed client uses."""
    classes: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            cls = getattr(mod, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException) and not issubclass(cls, HfHubHTTPError):
                classes.append(cls)
    return tuple(classes)


_TRANSPORT_ERRORS = _transport_errors()


def default_endpoint() -> str:
    """``HF_ENDPOINT`` as it is now, else the endpoint the client was configured with at import (the client reads
    the variable once; reading it here too lets a process that sets it late, such as a test, be obeyed)."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or hf_constants.ENDPOINT


def _api(endpoint: str | None, token: str | bool | None) -> HfApi:
    return HfApi(endpoint=endpoint or default_endpoint(), token=token)


def _offline() -> bool:
    """Offline mode, read both as the client saw it at import and from the environment now."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return hf_constants.HF_HUB_OFFLINE or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:200]
    return error.__class__.__name__


def _status(error: HfHubHTTPError) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _is_card_rejection(error: BaseException) -> bool:
    cause = error.__cause__
    if not isinstance(cause, BadRequestError):
        return False
    url = str(getattr(getattr(cause, "response", None), "url", ""))
    return url.endswith("/api/validate-yaml")


def validate_repo_id(repo_id: str) -> None:
    """Raise ``InvalidRepoIdError`` (one line) unless ``repo_id`` is a valid Hub repo id."""
    _check_repo_id(repo_id)


def _check_repo_id(repo_id: str) -> None:
    try:
        _hf_validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InvalidRepoIdError(
            f"{repo_id!r} is not a valid Hub repo id ({_first_line(e)}); "
            "use org/name with letters, digits, '-', '_', '.'",
            repo_id,
        ) from e


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, endpoint: str, *, action: str) -> Iterator[None]:
    """Translate ``huggingface_hub`` errors raised in the block into patchlab's one-line ``Hub*`` errors."""
    at = f"{repo_id}@{revision}" if revision else repo_id
    login = "log in with `hf auth login` or set HF_TOKEN"
    try:
        yield
    except HubError:
        raise
    except HFValidationError as e:
        raise InvalidRepoIdError(f"{action} {at}: {_first_line(e)}; fix the repo id or revision", repo_id) from e
    except RevisionNotFoundError as e:
        raise HubRevisionNotFoundError(
            f"{action} {at}: revision {revision!r} not found; check the branch, tag or commit "
            f"(list them with `hf repo branch`/`hf repo tag` or on the repo page)",
            repo_id,
        ) from e
    except GatedRepoError as e:
        raise HubAuthError(
            f"{action} {at}: the repo is gated; accept its conditions on the repo page, then {login}", repo_id
        ) from e
    except RepositoryNotFoundError as e:
        raise HubRepoNotFoundError(
            f"{action} {at}: repo not found at {endpoint}, or it is private and your token cannot see it; "
            f"check the id or {login}",
            repo_id,
        ) from e
    except RemoteEntryNotFoundError as e:
        raise HubFileNotFoundError(f"{action} {at}: {_first_line(e)}; check the file name", repo_id) from e
    except HfHubHTTPError as e:
        status = _status(e)
        if status == 401:
            raise HubAuthError(f"{action} {at}: the Hub rejected the token (401); {login}", repo_id) from e
        if status == 403:
            raise HubAuthError(
                f"{action} {at}: permission denied (403); use a token with write access to this repo ({login})",
                repo_id,
            ) from e
        if status in (409, 412) and action.startswith("push"):
            raise RemoteHeadMovedError(
                f"{action} {at}: the branch moved while pushing ({status}); pull or inspect the repo, then push again",
                repo_id,
            ) from e
        if status is not None and status >= 500:
            raise HubServerError(
                f"{action} {at}: the Hub at {endpoint} failed ({status}); try again later", repo_id, status
            ) from e
        raise HubServerError(f"{action} {at}: the Hub answered {status}: {_first_line(e)}", repo_id, status) from e
    except (LocalEntryNotFoundError, RevisionResolutionError) as e:
        cause = e.__cause__
        if isinstance(cause, HfHubHTTPError) and (_status(cause) or 0) >= 500:  # the Hub is down, no cache
            raise HubServerError(
                f"{action} {at}: the Hub at {endpoint} failed ({_status(cause)}) and it is not in the local cache; "
                "try again later",
                repo_id,
                _status(cause),
            ) from e
        if _offline():
            raise HubOfflineError(
                f"{action} {at}: HF_HUB_OFFLINE=1 and it is not (completely) in the local cache; "
                f"download it once online or unset HF_HUB_OFFLINE",
                repo_id,
            ) from e
        raise HubConnectionError(
            f"{action} {at}: cannot reach the Hub at {endpoint} and it is not in the local cache; "
            f"check your network or HF_ENDPOINT",
            repo_id,
        ) from e
    except ValueError as e:
        if _is_card_rejection(e):
            reason = " ".join(line.strip("- ").strip() for line in str(e).splitlines()[1:] if line.strip())
            raise HubCardRejectedError(
                f"{action} {at}: the Hub rejected the model card metadata ({reason or 'no reason given'}); "
                f"fix the card's front matter",
                repo_id,
            ) from e
        raise
    except _TRANSPORT_ERRORS as e:
        if isinstance(e, OfflineModeIsEnabled) or _offline():
            raise HubOfflineError(
                f"{action} {at}: HF_HUB_OFFLINE=1 forbids network access; unset HF_HUB_OFFLINE", repo_id
            ) from e
        if action == "download":
            raise HubDownloadError(
                f"{action} {at}: the download was interrupted ({e.__class__.__name__}) and did not resume; "
                f"nothing partial was kept, check your network and run it again",
                repo_id,
            ) from e
        raise HubConnectionError(
            f"{action} {at}: cannot reach the Hub at {endpoint} ({e.__class__.__name__}); "
            f"check your network or HF_ENDPOINT and try again",
            repo_id,
        ) from e
    except OSError as e:
        if "Consistency check failed" in str(e):
            raise HubDownloadError(
                f"{action} {at}: a file arrived incomplete; nothing partial was kept, run the command again",
                repo_id,
            ) from e
        raise


class _SilentTqdm(hf_tqdm):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


# -- revisions ---------------------------------------------------------------------------------------------------


def resolve_revision(
    repo_id: str,
    revision: str | None = None,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
) -> str:
    """The full 40-hex commit sha that ``revision`` (branch, tag, sha or short sha; default ``main``) names now.

    Always asks the Hub (``model_info``), also for a full sha, so a sha that does not exist is refused.

    Raises:
        InvalidRepoIdError, HubRepoNotFoundError, HubRevisionNotFoundError, HubAuthError, HubConnectionError,
        HubOfflineError, HubServerError.
    """
    _check_repo_id(repo_id)
    endpoint = endpoint or default_endpoint()
    if _offline():
        raise HubOfflineError(
            f"resolve {repo_id}@{revision or 'main'}: HF_HUB_OFFLINE=1 forbids asking the Hub; unset HF_HUB_OFFLINE",
            repo_id,
        )
    with _hub_errors(repo_id, revision, endpoint, action="resolve"):
        sha = _api(endpoint, token).model_info(repo_id, revision=revision).sha
    if not sha:
        raise HubServerError(f"resolve {repo_id}@{revision}: the Hub answered without a commit sha", repo_id)
    return sha


def list_tags(repo_id: str, *, endpoint: str | None = None, token: str | bool | None = None) -> dict[str, str]:
    """The repo's tags, name -> commit sha (what a ``patchlab watch --tags`` looks for)."""
    _check_repo_id(repo_id)
    endpoint = endpoint or default_endpoint()
    if _offline():
        raise HubOfflineError(f"list the tags of {repo_id}: HF_HUB_OFFLINE=1 forbids asking the Hub", repo_id)
    with _hub_errors(repo_id, None, endpoint, action="list the tags of"):
        refs = _api(endpoint, token).list_repo_refs(repo_id)
    return {t.name: t.target_commit for t in refs.tags}


# -- downloads ---------------------------------------------------------------------------------------------------


def download_checkpoint(
    repo_id: str,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool | type = True,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """Download what a checkpoint needs of ``repo_id`` at ``revision`` into the Hugging Face cache.

    Only top-level config, generation config, tokenizer files, ``*.safetensors`` and the safetensors index are
    fetched (``CHECKPOINT_PATTERNS``). The revision is resolved to a commit sha first, so the returned path is
    ``<cache>/models--org--name/snapshots/<sha>``: ``path.name`` is the commit to record. Files already in the
    cache are not downloaded again (an interrupted download resumes file by file). Offline (``HF_HUB_OFFLINE=1``)
    the cache alone answers. A failed download removes the snapshot folder it created, so no half checkpoint is
    ever returned or left where a later offline call would find it.

    Raises:
        InvalidRepoIdError, HubRepoNotFoundError, HubRevisionNotFoundError, HubAuthError, HubConnectionError,
        HubOfflineError, HubDownloadError, HubServerError; CheckpointNotFoundError when the revision holds no
        ``config.json`` or no ``*.safetensors``.

    ``progress``: the client's own bars (True), none (False), or a ``tqdm`` subclass to draw them (a CLI's).
    """
    _check_repo_id(repo_id)
    endpoint = endpoint or default_endpoint()
    tqdm_class = progress if isinstance(progress, type) else (None if progress else _SilentTqdm)
    common: dict[str, Any] = dict(
        repo_type="model",
        cache_dir=cache_dir,
        allow_patterns=list(CHECKPOINT_PATTERNS),
        ignore_patterns=list(_SUBFOLDERS),
        endpoint=endpoint,
        token=token,
        tqdm_class=tqdm_class,
    )
    if _offline():
        with _hub_errors(repo_id, revision, endpoint, action="download"):
            path = Path(snapshot_download(repo_id, revision=revision or "main", local_files_only=True, **common))
    else:
        with _hub_errors(repo_id, revision, endpoint, action="resolve"):
            # also records revision -> sha under refs/ in the cache, which an offline call reads later
            resolved = _api(endpoint, token).resolve_revision(repo_id, revision=revision, cache_dir=cache_dir)
        cache = Path(cache_dir) if cache_dir is not None else Path(hf_constants.HF_HUB_CACHE)
        snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / resolved.resolved
        existed = snapshot.exists()
        try:
            with _hub_errors(repo_id, revision, endpoint, action="download"):
                path = Path(snapshot_download(repo_id, revision=resolved, **common))
        except BaseException:
            if not existed:
                shutil.rmtree(snapshot, ignore_errors=True)
            raise
    names = {p.name for p in path.iterdir()}
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise CheckpointNotFoundError(
            f"{repo_id}@{revision or 'main'} has no config.json or no *.safetensors at its top level; "
            f"patchlab reads safetensors checkpoints only"
        )
    return path


def cached_checkpoint(repo_id: str, revision: str, cache_dir: str | Path | None = None) -> Path | None:
    """The snapshot of ``repo_id`` at ``revision`` (best a full sha) in the local cache, without any request;
    None when it is not there or lacks ``config.json`` or ``*.safetensors``."""
    _check_repo_id(repo_id)
    try:
        path = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=True,
                allow_patterns=list(CHECKPOINT_PATTERNS),
                ignore_patterns=list(_SUBFOLDERS),
                tqdm_class=_SilentTqdm,
            )
        )
    except (LocalEntryNotFoundError, RevisionResolutionError, OfflineModeIsEnabled, OSError, ValueError):
        return None
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        return None
    return path


@dataclass(frozen=True)
class PulledFolder:
    """A repo revision downloaded by ``download_folder``."""

    path: Path
    repo_id: str
    revision: str
    commit_sha: str


def download_folder(
    repo_id: str,
    revision: str | None,
    dest: str | Path,
    *,
    overwrite: bool = False,
    allow_patterns: Sequence[str] | None = None,
    progress: bool | type = True,
    endpoint: str | None = None,
    token: str | bool | None = None,
) -> PulledFolder:
    """Download every file of ``repo_id`` at ``revision`` (or those matching ``allow_patterns``) into ``dest``.

    The revision is resolved to a sha first and exactly that commit is downloaded, into a temporary directory
    beside ``dest`` (``.<name>.partial-*``) that is renamed to ``dest`` at the end: on any failure nothing is left
    at or beside ``dest``. An existing ``dest`` is refused unless ``overwrite``.

    Raises:
        OutputExistsError, and the ``Hub*`` errors of ``resolve_revision`` and ``download_checkpoint``.
    """
    _check_repo_id(repo_id)
    endpoint = endpoint or default_endpoint()
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise OutputExistsError(f"{dest} already exists; choose another destination or pass --overwrite")
    if dest.exists() and not dest.is_dir():
        raise OutputExistsError(f"{dest} exists and is not a directory; remove it first")
    sha = resolve_revision(repo_id, revision, endpoint=endpoint, token=token)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with _hub_errors(repo_id, revision, endpoint, action="download"):
            snapshot_download(
                repo_id,
                repo_type="model",
                revision=sha,
                local_dir=tmp,
                allow_patterns=list(allow_patterns) if allow_patterns is not None else None,
                endpoint=endpoint,
                token=token,
                tqdm_class=progress if isinstance(progress, type) else (None if progress else _SilentTqdm),
            )
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # the client's local-dir bookkeeping
        if dest.exists():
            trash = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dest, trash)
            os.rename(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PulledFolder(dest, repo_id, revision or "main", sha)


# -- push --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    """What a push did. ``created_commit`` is False when the remote already held exactly these files."""

    repo_id: str
    revision: str  # the branch pushed to, or ``refs/pr/N`` for a pull request
    commit_sha: str  # the new commit, or the unchanged head when no commit was made
    created_commit: bool
    commit_url: str | None = None
    pr_url: str | None = None
    changed_files: tuple[str, ...] = field(default_factory=tuple)
    deleted_files: tuple[str, ...] = field(default_factory=tuple)


def _local_files(folder: Path) -> dict[str, Path]:
    """Files to push: every regular file under ``folder`` except hidden ones (``.git``, ``.cache`` ...)."""
    out: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        out[rel.as_posix()] = path
    return out


def _hashes(source: Path | bytes) -> tuple[int, str, str]:
    """(size, git blob sha1, sha256) of a file or bytes, streaming."""
    if isinstance(source, bytes):
        size = len(source)
        chunks: Iterator[bytes] = iter([source])
    else:
        size = source.stat().st_size

        def read(path: Path = source) -> Iterator[bytes]:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk

        chunks = read()
    git, sha256 = hashlib.sha1(b"blob %d\0" % size), hashlib.sha256()
    for chunk in chunks:
        git.update(chunk)
        sha256.update(chunk)
    return size, git.hexdigest(), sha256.hexdigest()


def _same(local: Path | bytes, sibling: Any) -> bool:
    """Whether a local file equals a remote one, from ``model_info(files_metadata=True)`` siblings."""
    if sibling is None:
        return False
    size, git, sha256 = _hashes(local)
    if sibling.lfs is not None:
        return sibling.lfs.sha256 == sha256 and sibling.lfs.size == size
    return sibling.blob_id is not None and sibling.blob_id == git


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    commit_message: str,
    revision: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    parent_commit: str | None = None,
    card: ModelCard | str | None = None,
    delete_extra: bool = True,
    commit_description: str | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
) -> PushResult:
    """Push the files of ``folder`` (and ``card`` as README.md) to ``repo_id`` as ONE commit.

    - Creates the repo (``private`` applies only then) and the branch ``revision`` (from ``main``) when missing.
    - Idempotent: when every local file equals the remote one (git blob sha1, or sha256 for LFS files) and, with
      ``delete_extra``, the remote holds no other file (``.gitattributes`` aside), no commit is made and
      ``created_commit`` is False.
    - ``parent_commit``: refuse with ``RemoteHeadMovedError`` unless the branch head is still that commit. With
      ``create_pr`` the pull request starts from it instead. Every commit is sent with the head it was compared
      against as its parent, so a push that races another one is refused by the Hub, not merged blindly.
    - ``delete_extra`` (default): remote files that are not in ``folder`` are deleted in the same commit, so the
      revision holds exactly the folder (a stale shard or index cannot outlive a re-push).

    Raises:
        HubPushSourceError, InvalidRepoIdError, RemoteHeadMovedError, HubCardRejectedError, HubAuthError,
        HubRepoNotFoundError, HubRevisionNotFoundError (``revision`` is a tag or a commit, not a branch),
        HubConnectionError, HubServerError.
    """
    _check_repo_id(repo_id)
    endpoint = endpoint or default_endpoint()
    folder = Path(folder)
    if not folder.is_dir():
        raise HubPushSourceError(f"push to {repo_id}: {folder} is not a directory; give the folder to push", repo_id)
    local: dict[str, Path | bytes] = dict(_local_files(folder))
    if card is not None:
        local["README.md"] = str(card).encode()
    if not local:
        raise HubPushSourceError(f"push to {repo_id}: {folder} holds no files; nothing to push", repo_id)
    if not commit_message or not commit_message.strip():
        raise ValueError("commit_message must not be empty")
    if _offline():
        raise HubOfflineError(f"push to {repo_id}: HF_HUB_OFFLINE=1 forbids network access; unset it", repo_id)

    api = _api(endpoint, token)
    branch = revision or hf_constants.DEFAULT_REVISION
    with _hub_errors(repo_id, branch, endpoint, action="push to"):
        api.create_repo(repo_id, private=private, exist_ok=True)
        refs = api.list_repo_refs(repo_id)
        branches = {b.name: b.target_commit for b in refs.branches}
        if branch not in branches:
            if branch in {t.name for t in refs.tags} or _looks_like_sha(branch):
                raise HubRevisionNotFoundError(
                    f"push to {repo_id}@{branch}: {branch!r} is not a branch; push to a branch (--revision NAME)",
                    repo_id,
                )
            api.create_branch(repo_id, branch=branch, exist_ok=True)

        head_info = api.model_info(repo_id, revision=branch, files_metadata=True)
        head = head_info.sha or ""
        base_info = head_info
        if parent_commit is not None:
            if create_pr:
                base_info = api.model_info(repo_id, revision=parent_commit, files_metadata=True)
            elif not head.startswith(parent_commit.lower()):
                raise RemoteHeadMovedError(
                    f"push to {repo_id}@{branch}: the branch head is {head[:12]}, "
                    f"not {parent_commit[:12]} as expected; "
                    f"someone pushed since: pull or inspect it, then push again with the new parent",
                    repo_id,
                )
        base = base_info.sha or head
        remote = {s.rfilename: s for s in (base_info.siblings or [])}
        changed = [p for p, src in local.items() if not _same(src, remote.get(p))]
        deleted = sorted(p for p in remote if p not in local and p != GITATTRIBUTES) if delete_extra else []
        if not changed and not deleted:
            return PushResult(repo_id, branch, base, False)

        operations: list[CommitOperationAdd | CommitOperationDelete] = [
            CommitOperationAdd(
                path_in_repo=p, path_or_fileobj=local[p] if isinstance(local[p], bytes) else str(local[p])
            )
            for p in changed
        ]
        operations += [CommitOperationDelete(path_in_repo=p) for p in deleted]
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=branch,
            create_pr=create_pr,
            parent_commit=base,
        )
    created = info.oid != base
    pushed_to = f"refs/pr/{info.pr_num}" if create_pr and info.pr_num is not None else branch
    return PushResult(
        repo_id,
        pushed_to,
        info.oid,
        created,
        commit_url=str(info.commit_url) if info.commit_url else None,
        pr_url=info.pr_url,
        changed_files=tuple(changed) if created else (),
        deleted_files=tuple(deleted) if created else (),
    )


def _looks_like_sha(revision: str) -> bool:
    return len(revision) >= 7 and all(c in "0123456789abcdef" for c in revision.lower())


# -- model cards -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CardEval:
    """One evaluation result for a card: ``metric`` on ``task`` (e.g. accuracy, negative_flip_rate)."""

    task: str
    metric: str
    value: float
    dataset: str | None = None
    against: str | None = None  # what a relative metric compares with, e.g. the previous version


def build_model_card(
    *,
    name: str,
    base_model: str | Sequence[str] | None,
    relation: Relation,
    method: str,
    base_label: str | None = None,
    base_fingerprint: str | None = None,
    library_name: str | None = None,
    lineage: Sequence[str] = (),
    evals: Sequence[CardEval] = (),
    verdict: str | None = None,
    tags: Sequence[str] = (),
    license: str | None = None,  # noqa: A002 - the Hub's field name
    new_version: str | None = None,
    description: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> ModelCard:
    """A model card for a pushed patch, adapter or model (``ModelCard.validate()`` is never called).

    ``base_model`` is the base's Hub repo id (several for a merge); a base that is not on the Hub is given as
    ``base_label`` (family@version) and ``base_fingerprint``, written to the body and to a ``patchlab`` metadata
    block, since the Hub's ``base_model`` field only takes repo ids. ``relation`` is ``adapter`` (PEFT), ``merge``,
    ``finetune`` (ports and patches) or ``quantized``. ``lineage`` lists the steps newest first (``this patch <-
    port of task@1 on llama@3.1``); ``evals`` become the card's ``model-index``; ``verdict`` is the compatibility
    report's conclusion; ``metadata`` adds keys to the ``patchlab`` block (what a later pull reads back).
    """
    bases = [base_model] if isinstance(base_model, str) else list(base_model or [])
    for b in bases:
        _check_repo_id(b)
    all_tags = ["patchlab", method, *tags]
    if relation == "adapter":
        all_tags.append("lora")
    extra: dict[str, Any] = {"base_model_relation": relation} if bases else {}
    patchlab_meta: dict[str, Any] = {"method": method, **(metadata or {})}
    if base_label:
        patchlab_meta["base"] = base_label
    if base_fingerprint:
        patchlab_meta["base_fingerprint"] = base_fingerprint
    if verdict:
        patchlab_meta["verdict"] = verdict
    if lineage:
        patchlab_meta["lineage"] = list(lineage)
    if new_version:
        extra["new_version"] = new_version
    eval_results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=e.dataset or e.task,
            dataset_name=e.dataset or e.task,
            metric_type=e.metric,
            metric_value=e.value,
            metric_name=f"{e.metric} vs {e.against}" if e.against else e.metric,
        )
        for e in evals
    ]
    data = ModelCardData(
        base_model=(bases[0] if len(bases) == 1 else bases) or None,
        library_name=library_name or ("peft" if relation == "adapter" else None),
        license=license,
        tags=list(dict.fromkeys(all_tags)),
        model_name=name,
        eval_results=eval_results or None,
        patchlab=patchlab_meta,
        **extra,
    )

    lines = [f"# {name}", ""]
    if description:
        lines += [description, ""]
    what = {"adapter": "a PEFT adapter", "merge": "a merge", "finetune": "a fine-tune", "quantized": "a quantization"}
    base_text = ", ".join(f"[{b}](https://huggingface.co/{b})" for b in bases) or base_label or "an unnamed base"
    lines.append(f"This is {what[relation]} of {base_text}, made with patchlab ({method}).")
    if base_label and bases:
        lines.append(f"patchlab base: {base_label}.")
    if base_fingerprint:
        lines.append(f"Base fingerprint: `{base_fingerprint}`.")
    if lineage:
        lines += ["", "## Lineage", ""] + [f"- {step}" for step in lineage]
    if evals:
        lines += ["", "## Evaluation", "", "| task | metric | value |", "|---|---|---|"]
        for e in evals:
            metric = f"{e.metric} (vs {e.against})" if e.against else e.metric
            lines.append(f"| {e.dataset or e.task} | {metric} | {e.value:.4g} |")
    if verdict:
        lines += ["", "## Compatibility", "", verdict]
    lines.append("")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def card_metadata(readme: str | Path) -> dict[str, Any]:
    """The front matter of a model card file (README.md) as a dict; empty when it has none or is unreadable."""
    path = Path(readme)
    if not path.is_file():
        return {}
    try:
        return ModelCard(path.read_text(encoding="utf-8")).data.to_dict()
    except (ValueError, UnicodeDecodeError, OSError):
        return {}


# Keep a reference so the version the module was written against is visible in tracebacks and bug reports.
CLIENT_VERSION = huggingface_hub.__version__
