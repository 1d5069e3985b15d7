"""Base drifts: how far a release moved from an older one, per tensor, recorded once and reused.

Every diagnosis of a patch made on release A and ported onto release B needs the two releases' shared sums
(``‖B − A‖²``, ``‖A‖²``, ``‖B‖²`` per tensor: ``measure.diagnose.BaseDrift``). Measuring them means reading A,
which no port of a patch onto B reads otherwise. ``base add`` measures them when it registers B (it reads B
anyway to fingerprint it) from each older release that carries live patches; upgrades and dry-run verdicts
between the two then read neither base for them. A recorded drift is valid while both releases keep the content
fingerprints it was measured on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry import refs
from registry.db import retry_locked
from registry.rows import BaseDriftRow, BaseVersionRow, FamilyRow
from registry.topic import Topic

if TYPE_CHECKING:  # torch stays unimported until a drift is measured or read
    from patchlab.kernels.drift import DriftStats
    from patchlab.measure.diagnose import BaseDrift


class Drifts(Topic):
    def base_drift(self, source: str, target: str) -> BaseDrift | None:
        """The recorded drift of release ``target`` from ``source`` (``FAMILY@VERSION`` each), with the two
        releases' current checkpoint paths; None when none is recorded or either release's content is no longer
        the one it was measured on."""
        from patchlab.measure.diagnose import BaseDrift

        with self.db.read() as s:
            src, tgt = _base_row(s, source), _base_row(s, target)
            row = s.execute(
                select(BaseDriftRow).where(BaseDriftRow.source_id == src.id, BaseDriftRow.target_id == tgt.id)
            ).scalar_one_or_none()
            if row is None or (row.source_content, row.target_content) != (src.content, tgt.content):
                return None
            sums = dict(row.sums)
        data = {
            "source": str(self.checkpoint_path(source)),  # type: ignore[attr-defined]
            "target": str(self.checkpoint_path(target)),  # type: ignore[attr-defined]
            **sums,
        }
        return BaseDrift.from_dict(data)

    def drifts_to(self, target: str) -> dict[str, DriftStats]:
        """Release -> how far ``target`` moved from it (all recorded tensors together), for every older release
        whose drift to ``target`` is recorded and still valid."""
        from patchlab.measure.diagnose import BaseDrift

        with self.db.read() as s:
            tgt = _base_row(s, target)
            rows = s.execute(
                select(BaseDriftRow, BaseVersionRow)
                .join(BaseVersionRow, BaseVersionRow.id == BaseDriftRow.source_id)
                .where(BaseDriftRow.target_id == tgt.id)
                .order_by(BaseVersionRow.release_order)
            ).all()
            out = {}
            for row, src in rows:
                if (row.source_content, row.target_content) == (src.content, tgt.content):
                    out[_label(s, src)] = BaseDrift.from_dict({"source": "", "target": "", **row.sums}).overall()
            return out

    def record_base_drift(self, source: str, target: str, drift: BaseDrift) -> None:
        """Record the drift of ``target`` from ``source``, adding its tensors to those already recorded for the
        pair (an upgrade that needed tensors a recorded drift lacks measures and records just those)."""

        def run() -> None:
            with self.db.write() as s:
                src, tgt = _base_row(s, source), _base_row(s, target)
                if src.content is None or tgt.content is None:
                    return  # a Hub base not fingerprinted yet: nothing to tie the sums to
                self._store_drift(s, src, tgt, drift)

        retry_locked(run)

    @staticmethod
    def _store_drift(s: Any, src: BaseVersionRow, tgt: BaseVersionRow, drift: BaseDrift) -> None:
        row = s.execute(
            select(BaseDriftRow).where(BaseDriftRow.source_id == src.id, BaseDriftRow.target_id == tgt.id)
        ).scalar_one_or_none()
        sums = drift.sums_dict()
        if row is not None and (row.source_content, row.target_content) == (src.content, tgt.content):
            have = dict(row.sums)
            sums = {
                "tensors": {**have.get("tensors", {}), **sums["tensors"]},
                "target_sumsq": {**have.get("target_sumsq", {}), **sums["target_sumsq"]},
            }
        if row is None:
            row = BaseDriftRow(source_id=src.id, target_id=tgt.id)
            s.add(row)
        row.source_content, row.target_content, row.sums = src.content, tgt.content, sums

    def _older_releases_in_use(self, family: str, order: int) -> list[tuple[str, Path]]:
        """``(ref, checkpoint path)`` of the family's local releases before ``order`` that carry a live patch
        (the newest version of a name): the releases an upgrade to a new release at ``order`` would start from.
        A release whose files changed since registration is left out (its own commands say so)."""
        from registry.errors import BaseChangedError

        bases = {b.ref: b for b in self.list_bases(family)}  # type: ignore[attr-defined]
        used = {p.base for p in self.list_patches(family=family, all_versions=False)}  # type: ignore[attr-defined]
        out = []
        for ref, b in sorted(bases.items(), key=lambda kv: kv[1].release_order):
            if ref in used and b.release_order < order and b.source_kind == "local" and b.content:
                try:
                    out.append((ref, self.checkpoint_path(ref)))  # type: ignore[attr-defined]
                except BaseChangedError:
                    continue
        return out


def _base_row(s: Session, ref: str) -> BaseVersionRow:
    row = s.get(BaseVersionRow, refs.resolve_base(s, ref).id)
    assert row is not None
    return row


def _label(s: Session, row: BaseVersionRow) -> str:
    return refs.base_label(s.get(FamilyRow, row.family_id).name, row.version)  # type: ignore[union-attr]


def measure_release_drift(source: Path, target: Path, device: str = "auto") -> BaseDrift:
    """The drift sums of every floating tensor the two checkpoints share in the same shape (one streaming pass
    over both; the source's pages are dropped from the cache once summed)."""
    from patchlab.io.checkpoint import Checkpoint
    from patchlab.measure.diagnose import base_drift

    src = Checkpoint.open(source)
    names = [n for n in src.names if src.info(n).dtype.is_floating_point]
    return base_drift(src, target, names, device=device, release_source=True)
