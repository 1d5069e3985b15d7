"""Derived models: full models made by applying or porting a patch onto a base, recorded by path."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry import refs
from registry.db import retry_locked
from registry.records import DerivedInfo, timestamp
from registry.rows import BaseVersionRow, DerivedModelRow, FamilyRow, PatchRow
from registry.topic import Topic, json_safe


class Derived(Topic):
    def add_derived(
        self,
        patch: str,
        path: str | os.PathLike[str],
        *,
        base: str | None = None,
        kind: str = "apply",
        parameters: Mapping[str, Any] | None = None,
        content: str | None = None,
        reuse: bool = False,
    ) -> DerivedInfo:
        """Record a model made by applying/porting ``patch`` onto ``base``; ``path`` is where it lives.

        ``reuse``: give back the row already recorded for this patch and path, if any (a resumed run's), rather
        than add another; checked and added in one transaction."""
        out = str(Path(path).expanduser().resolve())
        params = json_safe(dict(parameters or {}), "parameters")

        def run() -> DerivedInfo:
            with self.db.write() as s:
                pid = refs.resolve_patch(s, patch).id
                if reuse:
                    have = s.execute(
                        select(DerivedModelRow.id)
                        .where(DerivedModelRow.patch_id == pid, DerivedModelRow.path == out)
                        .order_by(DerivedModelRow.id)
                        .limit(1)
                    ).scalar_one_or_none()
                    if have is not None:
                        return derived_infos(s, [have])[0]
                bid = refs.resolve_base(s, base).id if base is not None else None
                row = DerivedModelRow(
                    patch_id=pid, base_version_id=bid, kind=kind, path=out, parameters=params, content=content
                )
                s.add(row)
                s.flush()
                return derived_infos(s, [row.id])[0]

        return retry_locked(run)

    def list_derived(self, patch: str | None = None) -> list[DerivedInfo]:
        with self.db.read() as s:
            q = select(DerivedModelRow.id).order_by(DerivedModelRow.id)
            if patch is not None:
                q = q.where(DerivedModelRow.patch_id == refs.resolve_patch(s, patch).id)
            return derived_infos(s, list(s.execute(q).scalars()))

    def get_derived(self, ref: str) -> DerivedInfo:
        with self.db.read() as s:
            return derived_infos(s, [refs.resolve_derived(s, ref).id])[0]


def derived_infos(s: Session, ids: Sequence[int]) -> list[DerivedInfo]:
    if not ids:
        return []
    rows = s.execute(
        select(DerivedModelRow, PatchRow.name, PatchRow.version, FamilyRow.name, BaseVersionRow.version)
        .join(PatchRow, PatchRow.id == DerivedModelRow.patch_id)
        .outerjoin(BaseVersionRow, BaseVersionRow.id == DerivedModelRow.base_version_id)
        .outerjoin(FamilyRow, FamilyRow.id == BaseVersionRow.family_id)
        .where(DerivedModelRow.id.in_(ids))
    ).all()
    by_id = {
        d.id: DerivedInfo(
            id=d.id,
            patch=f"{pn}@{pv}",
            base=f"{fam}@{bver}" if fam else None,
            kind=d.kind,
            path=d.path,
            parameters=d.parameters,
            content=d.content,
            created_at=timestamp(d.created_at),
        )
        for d, pn, pv, fam, bver in rows
    }
    return [by_id[i] for i in ids if i in by_id]
