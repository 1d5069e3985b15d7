"""Maintenance: removing entries (refusing while others depend on them), collecting unreferenced blobs,
verifying every stored blob."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from registry import refs
from registry.db import retry_locked
from registry.errors import DependencyError
from registry.lineage import descendants
from registry.records import BlobProblem, GcReport, VerifyReport
from registry.rows import (
    AliasRow,
    BaseDriftRow,
    BaseVersionRow,
    DerivedModelRow,
    FamilyRow,
    PatchFileRow,
    PatchParentRow,
    PatchRow,
)
from registry.topic import Topic


class Maintenance(Topic):
    def rm(self, ref: str, *, kind: str | None = None, cascade: bool = False) -> list[str]:
        """Remove a patch, base version or derived model (blobs stay until :meth:`gc`).

        Refuses when child patches, derived models or aliases depend on it, listing them; with
        ``cascade`` those are removed too. Returns the labels of everything removed.
        """

        def run() -> list[str]:
            with self.db.write() as s:
                t = refs.resolve_any(s, ref, kind)
                if t.kind == "derived":
                    s.execute(delete(DerivedModelRow).where(DerivedModelRow.id == t.id))
                    return [t.label]
                if t.kind == "base":
                    patch_ids = set(s.execute(select(PatchRow.id).where(PatchRow.base_version_id == t.id)).scalars())
                    base_ids = {t.id}
                else:
                    patch_ids, base_ids = {t.id}, set()
                closure = descendants(s, patch_ids)
                deps = dependants(s, closure, base_ids, root_patch=t.id if t.kind == "patch" else None)
                if deps and not cascade:
                    shown = ", ".join(deps[:10]) + (f" and {len(deps) - 10} more" if len(deps) > 10 else "")
                    raise DependencyError(
                        f"cannot remove {t.label}: {shown} depend on it; remove those first or pass "
                        "--cascade to remove them too"
                    )
                removed = [t.label] + deps
                derived_q = select(DerivedModelRow.id).where(
                    DerivedModelRow.patch_id.in_(closure) | DerivedModelRow.base_version_id.in_(base_ids)
                )
                s.execute(delete(DerivedModelRow).where(DerivedModelRow.id.in_(derived_q.scalar_subquery())))
                s.execute(
                    delete(AliasRow).where(AliasRow.patch_id.in_(closure) | AliasRow.base_version_id.in_(base_ids))
                )
                if closure:
                    s.execute(
                        delete(PatchParentRow).where(
                            PatchParentRow.child_id.in_(closure) | PatchParentRow.parent_id.in_(closure)
                        )
                    )
                    s.execute(delete(PatchRow).where(PatchRow.id.in_(closure)))
                if base_ids:
                    fam_ids = set(
                        s.execute(select(BaseVersionRow.family_id).where(BaseVersionRow.id.in_(base_ids))).scalars()
                    )
                    s.execute(
                        delete(BaseDriftRow).where(
                            BaseDriftRow.source_id.in_(base_ids) | BaseDriftRow.target_id.in_(base_ids)
                        )
                    )
                    s.execute(delete(BaseVersionRow).where(BaseVersionRow.id.in_(base_ids)))
                    for fid in fam_ids:
                        left = s.execute(
                            select(BaseVersionRow.id).where(BaseVersionRow.family_id == fid).limit(1)
                        ).first()
                        if left is None:
                            s.execute(delete(FamilyRow).where(FamilyRow.id == fid))
                return removed

        return retry_locked(run)

    def referenced_digests(self) -> dict[str, list[str]]:
        """Every blob digest rows point at -> the patch labels that use it."""
        with self.db.read() as s:
            out: dict[str, list[str]] = defaultdict(list)
            for dg, n, v in s.execute(
                select(PatchFileRow.digest, PatchRow.name, PatchRow.version).join(
                    PatchRow, PatchRow.id == PatchFileRow.patch_id
                )
            ).all():
                out[dg].append(f"{n}@{v}")
            for dg, n, v in s.execute(select(PatchRow.digest, PatchRow.name, PatchRow.version)).all():
                out[dg].append(f"{n}@{v}")
            return dict(out)

    def gc(self, *, grace_seconds: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Delete blobs no row refers to, older than ``grace_seconds`` (a patch being added right now
        writes its blobs before its row; the grace period keeps them). Also prunes stale cache entries, and
        removes what killed commands left: partial outputs beside the outputs the registry knows of and
        scratch copies, whose process is gone (or, when that cannot be told, older than the grace period).
        Orphaned outputs (complete, never recorded) are listed, not removed: rerunning the command that made
        one finishes its job."""
        leftovers = self.leftovers(grace_seconds)  # type: ignore[attr-defined]
        orphans = self.orphans()  # type: ignore[attr-defined]
        left_bytes = sum(x.size for x in leftovers)
        if not dry_run:
            from patchlab.io.outputs import remove_leftover

            for x in leftovers:
                remove_leftover(x)
            self.prune_journal()  # type: ignore[attr-defined]
        referenced = self.referenced_digests()
        removed, freed, kept, young = [], 0, 0, 0
        for dg in list(self.blobs.iter_digests()):
            if dg in referenced:
                kept += 1
                continue
            try:
                if self.blobs.age(dg) < grace_seconds:
                    young += 1
                    continue
            except FileNotFoundError:
                continue
            removed.append(dg)
            if not dry_run:
                freed += self.blobs.remove(dg)
        if not dry_run:
            self.blobs.clean_tmp(older_than=grace_seconds)
            patches_cache = self.cache / "patches"
            if patches_cache.is_dir():
                for d in patches_cache.iterdir():
                    if d.name not in referenced:
                        shutil.rmtree(d, ignore_errors=True)
        return GcReport(
            tuple(removed),
            freed,
            kept,
            young,
            dry_run,
            leftovers=tuple(f"{x.what}: {x.path}" for x in leftovers),
            leftover_bytes=left_bytes,
            orphans=tuple(str(p) for p in orphans),
        )

    def verify(self, *, full_bases: bool = False) -> VerifyReport:
        """Re-hash every referenced blob; report the missing or damaged ones and the patches they break.
        Local bases are checked too: their files' sizes and times against those recorded at registration
        (``full_bases``: their weights re-hashed against the content fingerprint)."""
        referenced = self.referenced_digests()
        problems = []
        for dg in sorted(referenced):
            state = self.blobs.check(dg)
            if state != "ok":
                problems.append(BlobProblem(dg, state, tuple(sorted(set(referenced[dg])))))
        with self.db.read() as s:
            local_bases = s.execute(
                select(FamilyRow.name, BaseVersionRow.version, BaseVersionRow.source)
                .join(FamilyRow, FamilyRow.id == BaseVersionRow.family_id)
                .where(BaseVersionRow.source_kind == "local")
                .order_by(FamilyRow.name, BaseVersionRow.release_order)
            ).all()
        missing_bases = tuple(f"{fam}@{ver}" for fam, ver, src in local_bases if not Path(src).is_dir())
        changed = tuple(
            (label, why)
            for label, why in self.verify_bases(full=full_bases)  # type: ignore[attr-defined]
            if label not in missing_bases
        )
        return VerifyReport(len(referenced), tuple(problems), missing_bases, changed, len(local_bases))


def dependants(s: Session, closure: set[int], base_ids: set[int], root_patch: int | None) -> list[str]:
    out: list[str] = []
    for pid, n, v in s.execute(
        select(PatchRow.id, PatchRow.name, PatchRow.version)
        .where(PatchRow.id.in_(closure))
        .order_by(PatchRow.name, PatchRow.version)
    ).all():
        if pid != root_patch:
            out.append(f"patch {n}@{v}")
    for (did,) in s.execute(
        select(DerivedModelRow.id).where(
            DerivedModelRow.patch_id.in_(closure) | DerivedModelRow.base_version_id.in_(base_ids)
        )
    ).all():
        out.append(f"derived model derived:{did}")
    for a in s.execute(
        select(AliasRow).where(AliasRow.patch_id.in_(closure) | AliasRow.base_version_id.in_(base_ids))
    ).scalars():
        out.append(f"alias {a.scope}@{a.name}")
    return out
