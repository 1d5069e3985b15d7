"""Pushes: what was pushed to which Hub repo and branch, at which commit (``patchlab push``, ``show``).

The newest push to a repo's branch is the commit the next push expects to find there: if the branch has
moved since, someone else pushed and ``patchlab push`` refuses unless forced.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry import refs
from registry.db import retry_locked
from registry.errors import InvalidReferenceError
from registry.records import PushInfo, timestamp
from registry.rows import PatchRow, PushRow
from registry.topic import Topic

PUSH_KINDS = ("patch", "peft", "model")


class Pushes(Topic):
    def record_push(
        self,
        source: str,
        *,
        endpoint: str,
        repo_id: str,
        revision: str,
        branch: str,
        commit_sha: str,
        kind: str,
        created_commit: bool,
    ) -> PushInfo:
        """Record that ``source`` (a patch or derived model reference) was pushed to ``repo_id``."""
        if kind not in PUSH_KINDS:
            raise InvalidReferenceError(f"push kind must be one of {', '.join(PUSH_KINDS)}, not {kind!r}")

        def run() -> PushInfo:
            with self.db.write() as s:
                t = refs.resolve_any(s, source, None)
                if t.kind not in ("patch", "derived"):
                    raise InvalidReferenceError(f"{source!r} is a {t.kind}; only patches and derived models are pushed")
                row = PushRow(
                    endpoint=endpoint.rstrip("/"),
                    repo_id=repo_id,
                    revision=revision,
                    branch=branch,
                    commit_sha=commit_sha,
                    kind=kind,
                    patch_id=t.id if t.kind == "patch" else None,
                    derived_id=t.id if t.kind == "derived" else None,
                    created_commit=created_commit,
                )
                s.add(row)
                s.flush()
                return push_infos(s, [row.id])[0]

        return retry_locked(run)

    def last_push(self, endpoint: str, repo_id: str, branch: str) -> PushInfo | None:
        """The newest push to ``repo_id``'s ``branch`` itself (pull requests aside), from any source."""
        with self.db.read() as s:
            pid = s.execute(
                select(PushRow.id)
                .where(
                    PushRow.endpoint == endpoint.rstrip("/"),
                    PushRow.repo_id == repo_id,
                    PushRow.branch == branch,
                    PushRow.revision == branch,
                )
                .order_by(PushRow.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            return push_infos(s, [pid])[0] if pid is not None else None

    def list_pushes(self, source: str | None = None, *, kind: str | None = None) -> list[PushInfo]:
        """Pushes, oldest first; of one patch or derived model when ``source`` is given."""
        with self.db.read() as s:
            q = select(PushRow.id).order_by(PushRow.id)
            if source is not None:
                t = refs.resolve_any(s, source, kind)
                if t.kind == "patch":
                    q = q.where(PushRow.patch_id == t.id)
                elif t.kind == "derived":
                    q = q.where(PushRow.derived_id == t.id)
                else:
                    return []
            return push_infos(s, list(s.execute(q).scalars()))


def push_infos(s: Session, ids: Sequence[int]) -> list[PushInfo]:
    if not ids:
        return []
    rows = s.execute(
        select(PushRow, PatchRow.name, PatchRow.version)
        .outerjoin(PatchRow, PatchRow.id == PushRow.patch_id)
        .where(PushRow.id.in_(list(ids)))
    ).all()
    by_id = {
        r.id: PushInfo(
            id=r.id,
            endpoint=r.endpoint,
            repo_id=r.repo_id,
            revision=r.revision,
            branch=r.branch,
            commit_sha=r.commit_sha,
            kind=r.kind,
            source=f"{n}@{v}" if n is not None else f"derived:{r.derived_id}",
            created_commit=r.created_commit,
            created_at=timestamp(r.created_at),
        )
        for r, n, v in rows
    }
    return [by_id[i] for i in ids if i in by_id]
