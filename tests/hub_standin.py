"""A small Hugging Face Hub stand-in on 127.0.0.1 for tests (a fixture, not product code).

It implements what ``huggingface_hub`` 2.x sends for publishing and downloading model repos, checked against
the installed client's source (``hf_api.py``, ``_commit_api.py``, ``file_download.py``,
``_snapshot_download.py``, ``utils/_http.py``):

- ``POST /api/repos/create``: 409 when the repo exists (``exist_ok=True`` accepts it). A new repo gets an
  ``initial commit`` holding ``.gitattributes``, as on the Hub.
- ``POST /api/validate-yaml``: always JSON ``{"errors": [...], "warnings": [...]}`` (the client parses the body
  before it checks the status).
- ``POST /api/models/{repo}/preupload/{rev}``: ``uploadMode: "regular"`` for every file (so no LFS or Xet
  endpoint is needed), ``shouldIgnore: false`` and ``oid`` = git blob sha1 of the remote file when it exists
  (the client drops unchanged files with it).
- ``POST /api/models/{repo}/commit/{rev}[?create_pr=1]``: NDJSON lines ``{"key": "header"|"file"|
  "deletedFile"|"deletedFolder"|"lfsFile", "value": {...}}``; ``parentCommit`` must be the head of the branch
  (412 otherwise) unless ``create_pr``, where the PR starts from it. Answers ``commitUrl``, ``commitOid`` and
  ``pullRequestUrl``.
- ``GET /api/models/{repo}[/revision/{rev}][?blobs=1]``: ``id``, ``sha``, ``siblings`` (``size`` and
  ``blobId`` with ``blobs``).
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the file listing ``snapshot_download`` reads (client 2.x).
- ``GET /api/models/{repo}/refs``, ``GET .../commits/{rev}`` (newest first), ``POST .../branch/{name}``,
  ``POST .../tag/{rev}`` (409 when it exists).
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``ETag``, ``X-Repo-Commit``, ``Content-Length`` and
  ``Range`` (206) so the client can resume after a dropped connection.
- Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) like the Hub, since the
  client maps that header to its exception classes.

Every request is recorded (``hub.requests``, ``hub.commits_received``) and faults can be injected
(``hub.inject_error``, ``hub.inject_drop``) for bad-input tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: sha1 of ``blob <size>\\0`` + bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    files: dict[str, bytes]
    date: str = "2026-01-01T00:00:00.000Z"


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: list[str] = field(default_factory=list)  # refs/pr/{i+1} -> oid

    def resolve(self, rev: str) -> str | None:
        """A branch, tag, ``refs/pr/N``, full sha or unique sha prefix (7+ hex) -> commit oid."""
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if m := re.fullmatch(r"refs/pr/(\d+)", rev):
            i = int(m.group(1)) - 1
            return self.prs[i] if 0 <= i < len(self.prs) else None
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            hits = [oid for oid in self.commits if oid.startswith(rev)]
            return hits[0] if len(hits) == 1 else None
        return None


@dataclass
class ReceivedCommit:
    """One commit request as the stand-in received it (whether or not it was accepted)."""

    repo_id: str
    revision: str
    header: dict
    files: dict[str, bytes]
    deleted: list[str]
    create_pr: bool
    status: int = 0
    oid: str | None = None


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass
class Fault:
    method: str | None
    path: re.Pattern
    times: int | None  # None: every matching request
    status: int = 0
    error_code: str | None = None
    message: str | None = None
    body: dict | None = None
    drop_after: int | None = None  # bytes of body sent before the connection is cut


class HubStandin:
    """In-memory Hub. ``url`` is the endpoint to give ``HfApi(endpoint=...)``."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[RecordedRequest] = []
        self.commits_received: list[ReceivedCommit] = []
        self.yaml_validated: list[str] = []
        self._faults: list[Fault] = []
        self._lock = threading.RLock()
        self._seq = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> HubStandin:
        standin = self

        class Handler(_Handler):
            hub = standin

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        serve = self._server.serve_forever
        self._thread = threading.Thread(target=serve, args=(0.05,), name="hub-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None, "stand-in not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- test helpers ----------------------------------------------------------------------------
    def inject_error(
        self,
        status: int,
        *,
        path: str = ".*",
        method: str | None = None,
        error_code: str | None = None,
        message: str | None = None,
        body: dict | None = None,
        times: int | None = 1,
    ) -> None:
        """Answer the next ``times`` requests whose path matches the regex ``path`` with ``status``."""
        with self._lock:
            self._faults.append(Fault(method, re.compile(path), times, status, error_code, message, body))

    def inject_drop(self, *, path: str, after_bytes: int, times: int | None = 1) -> None:
        """Cut the connection of matching ``GET`` downloads after ``after_bytes`` bytes of the body."""
        with self._lock:
            self._faults.append(Fault("GET", re.compile(path), times, drop_after=after_bytes))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def accepted_commits(self, repo_id: str | None = None) -> list[ReceivedCommit]:
        return [c for c in self.commits_received if c.status == 200 and repo_id in (None, c.repo_id)]

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        oid = repo.resolve(rev)
        assert oid is not None, rev
        return dict(repo.commits[oid].files)

    def requests_to(self, pattern: str, method: str | None = None) -> list[RecordedRequest]:
        rx = re.compile(pattern)
        return [r for r in self.requests if rx.search(r.path) and method in (None, r.method)]

    # -- state changes (called with the lock held) -----------------------------------------------
    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, bytes], title: str, message: str) -> str:
        self._seq += 1
        tree = "\n".join(f"{p} {git_blob_oid(b)}" for p, b in sorted(files.items()))
        oid = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{tree}\n{title}\n{self._seq}".encode()).hexdigest()
        repo.commits[oid] = Commit(
            oid, parent, title, message, files, date=f"2026-01-01T00:00:{self._seq % 60:02d}.000Z"
        )
        return oid

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method not in (None, method) or not fault.path.search(path):
                    continue
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                return fault
        return None


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a cut connection is expected when a drop is injected
        pass


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code, self.headers = status, message, error_code, headers or {}


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandin
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - quiet test output
        pass

    # -- plumbing --------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        hub = self.hub
        with hub._lock:
            hub.requests.append(
                RecordedRequest(
                    method, split.path, parse_qs(split.query), {k.lower(): v for k, v in self.headers.items()}, body
                )
            )
        self._query = parse_qs(split.query)
        self._body = body
        fault = hub._take_fault(method, split.path)
        if fault is not None and fault.drop_after is None:
            payload = fault.body if fault.body is not None else {"error": fault.message or f"injected {fault.status}"}
            headers = {}
            if fault.error_code:
                headers["X-Error-Code"] = fault.error_code
            if fault.message:
                headers["X-Error-Message"] = fault.message
            self._json(fault.status, payload, headers, head=method == "HEAD")
            return
        try:
            self._route(method, split.path, drop=fault)
        except _HTTPError as e:
            headers = dict(e.headers)
            if e.error_code:
                headers["X-Error-Code"] = e.error_code
            headers["X-Error-Message"] = e.message
            self._json(e.status, {"error": e.message}, headers, head=method == "HEAD")

    def _json(self, status: int, payload, headers: dict | None = None, head: bool = False) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _body_json(self) -> dict:
        return json.loads(self._body or b"{}")

    # -- routing ---------------------------------------------------------------------------------
    def _route(self, method: str, path: str, drop: Fault | None) -> None:
        parts = path.strip("/").split("/")  # still quoted: a revision like refs%2Fpr%2F1 stays one part
        hub = self.hub
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo()
        if method == "POST" and path == "/api/validate-yaml":
            hub.yaml_validated.append(self._body_json().get("content", ""))
            return self._json(200, {"errors": [], "warnings": []})
        if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
            repo_id = f"{unquote(parts[2])}/{unquote(parts[3])}"
            rest = [unquote(p) for p in parts[4:]]
            with hub._lock:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    raise _HTTPError(404, f"Repository {repo_id} not found", "RepoNotFound")
                return self._api(method, repo, rest)
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
            rev = unquote(parts[3])
            file_path = "/".join(unquote(p) for p in parts[4:])
            return self._resolve(method, repo_id, rev, file_path, drop)
        raise _HTTPError(404, f"no route for {method} {path}")

    def _create_repo(self) -> None:
        payload = self._body_json()
        if payload.get("type", "model") != "model":
            raise _HTTPError(400, "the stand-in only holds model repos")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        hub = self.hub
        with hub._lock:
            if repo_id in hub.repos:
                # the client reads "url" from the 409 body too when exist_ok=True
                return self._json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
            oid = hub._new_commit(repo, None, {".gitattributes": GITATTRIBUTES}, "initial commit", "")
            repo.branches["main"] = oid
            hub.repos[repo_id] = repo
        self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _rev(self, repo: Repo, rev: str) -> str:
        oid = repo.resolve(rev)
        if oid is None:
            raise _HTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return oid

    def _api(self, method: str, repo: Repo, rest: list[str]) -> None:
        op = rest[0] if rest else ""
        if method == "GET" and op in ("", "revision"):
            rev = "/".join(rest[1:]) if op == "revision" else "main"
            return self._model_info(repo, self._rev(repo, rev))
        if method == "GET" and op == "tree":
            oid = self._rev(repo, rest[1])
            prefix = "/".join(rest[2:])
            return self._tree(repo, oid, prefix)
        if method == "GET" and op == "refs":

            def refs(d: dict[str, str], kind: str) -> list[dict]:
                return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": o} for n, o in d.items()]

            out = {"branches": refs(repo.branches, "heads"), "tags": refs(repo.tags, "tags"), "converts": []}
            if self._query.get("include_prs"):
                out["pullRequests"] = [
                    {"name": f"{i + 1}", "ref": f"refs/pr/{i + 1}", "targetCommit": o} for i, o in enumerate(repo.prs)
                ]
            return self._json(200, out)
        if method == "GET" and op == "commits":
            oid: str | None = self._rev(repo, "/".join(rest[1:]) or "main")
            history = []
            while oid is not None:
                c = repo.commits[oid]
                history.append(
                    {"id": c.oid, "title": c.title, "message": c.message, "authors": [{"user": "user"}], "date": c.date}
                )
                oid = c.parent
            return self._json(200, history)
        if method == "POST" and op == "preupload":
            oid = repo.resolve(rest[1]) if len(rest) > 1 else None
            files = repo.commits[oid].files if oid else {}
            answer = []
            for f in self._body_json().get("files", []):
                entry = {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                if f["path"] in files:
                    entry["oid"] = git_blob_oid(files[f["path"]])
                answer.append(entry)
            return self._json(200, {"files": answer, "commitOid": oid})
        if method == "POST" and op == "commit":
            return self._commit(repo, "/".join(rest[1:]))
        if method == "POST" and op == "branch":
            name = "/".join(rest[1:])
            start = self._body_json().get("startingPoint") or "main"
            if name in repo.branches:
                raise _HTTPError(409, f"Reference refs/heads/{name} already exists")
            repo.branches[name] = self._rev(repo, start)
            return self._json(200, {})
        if method == "POST" and op == "tag":
            target = self._rev(repo, "/".join(rest[1:]))
            tag = self._body_json()["tag"]
            if tag in repo.tags:
                raise _HTTPError(409, f"Tag {tag} already exists")
            repo.tags[tag] = target
            return self._json(200, {})
        raise _HTTPError(404, f"no route for {method} /api/models/{repo.repo_id}/{'/'.join(rest)}")

    def _model_info(self, repo: Repo, oid: str) -> None:
        blobs = bool(self._query.get("blobs"))
        siblings = []
        for p, data in sorted(repo.commits[oid].files.items()):
            s: dict = {"rfilename": p}
            if blobs:
                s.update(size=len(data), blobId=git_blob_oid(data))
            siblings.append(s)
        self._json(
            200,
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": oid,
                "private": repo.private,
                "tags": [],
                "siblings": siblings,
                "lastModified": repo.commits[oid].date,
            },
        )

    def _tree(self, repo: Repo, oid: str, prefix: str) -> None:
        entries, dirs = [], set()
        for p, data in sorted(repo.commits[oid].files.items()):
            if prefix and not p.startswith(prefix.rstrip("/") + "/"):
                continue
            for i in range(p.count("/")):
                dirs.add("/".join(p.split("/")[: i + 1]))
            entries.append({"type": "file", "path": p, "size": len(data), "oid": git_blob_oid(data)})
        folders = [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(dirs)]
        self._json(200, folders + entries)

    def _commit(self, repo: Repo, rev: str) -> None:
        hub = self.hub
        lines = [json.loads(line) for line in self._body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        create_pr = bool(self._query.get("create_pr"))
        received = ReceivedCommit(repo.repo_id, rev, header, {}, [], create_pr)
        hub.commits_received.append(received)
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                received.files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                received.deleted.append(value["path"])
            elif key == "lfsFile":
                received.status = 400
                raise _HTTPError(400, "the stand-in answers 'regular' for every file: no LFS file expected")
        if rev not in repo.branches:
            received.status = 404
            raise _HTTPError(404, f"Invalid rev id: {rev} (commits go to a branch)", "RevisionNotFound")
        head = repo.branches[rev]
        parent = header.get("parentCommit")
        if parent is not None:
            parent_oid = repo.resolve(parent)
            if parent_oid is None:
                received.status = 404
                raise _HTTPError(404, f"Invalid parent commit: {parent}", "RevisionNotFound")
            if parent_oid != head and not create_pr:
                received.status = 412
                raise _HTTPError(412, "A commit has happened since. Please refresh and try again.")
        base = parent_oid if parent is not None else head
        files = dict(repo.commits[base].files)
        for p in received.deleted:
            for existing in [f for f in files if f == p.rstrip("/") or f.startswith(p.rstrip("/") + "/")]:
                del files[existing]
        files.update(received.files)
        oid = hub._new_commit(repo, base, files, header.get("summary", ""), header.get("description", ""))
        received.status, received.oid = 200, oid
        answer = {"success": True, "commitOid": oid, "commitUrl": f"{hub.url}/{repo.repo_id}/commit/{oid}"}
        if create_pr:
            repo.prs.append(oid)
            answer["pullRequestUrl"] = f"{hub.url}/{repo.repo_id}/discussions/{len(repo.prs)}"
        else:
            repo.branches[rev] = oid
        self._json(200, answer)

    def _resolve(self, method: str, repo_id: str, rev: str, file_path: str, drop: Fault | None) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub.repos.get(repo_id)
            if repo is None:
                raise _HTTPError(404, f"Repository {repo_id} not found", "RepoNotFound")
            oid = self._rev(repo, rev)
            data = repo.commits[oid].files.get(file_path)
        if data is None:
            raise _HTTPError(404, f"Entry not found: {file_path}", "EntryNotFound", {"X-Repo-Commit": oid})
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and (m := re.fullmatch(r"bytes=(\d+)-", rng.strip())):
            start, status = int(m.group(1)), 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{git_blob_oid(data)}"')
        self.send_header("X-Repo-Commit", oid)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if method == "HEAD":
            return
        if drop is not None and drop.drop_after is not None:
            self.wfile.write(body[: drop.drop_after])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(body)
