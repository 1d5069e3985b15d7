"""Outputs the registry knows of: the paths no command may overwrite (its home, registered bases and
derived models), the outputs commands noted before writing them (``home/journal``), and what a killed
command left beside them (partial outputs, scratch copies, orphans), which ``gc`` lists and removes."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from sqlalchemy import select

from patchlab.io.outputs import (
    Leftover,
    is_orphan,
    owner_alive,
    read_marker,
    stale_partials,
    stale_scratch,
)
from registry.rows import BaseVersionRow, DerivedModelRow, FamilyRow
from registry.topic import Topic

JOURNAL = "journal"
#: what inside the home belongs to the registry itself: never an output, nor inside one
RESERVED = ("registry.db", "registry.db-wal", "registry.db-shm", "blobs", "cache", JOURNAL)
SCRATCH_PREFIXES = ("patchlab-compat-", "patchlab-demo-")


class Outputs(Topic):
    @property
    def journal(self) -> Path:
        return self.home / JOURNAL

    def protected_paths(self) -> list[tuple[Path, str]]:
        """Directories no output may replace: local bases' and derived models' (the home is protected by
        whoever opens the registry, with everything inside it)."""
        with self.db.read() as s:
            bases = s.execute(
                select(FamilyRow.name, BaseVersionRow.version, BaseVersionRow.source)
                .join(FamilyRow, FamilyRow.id == BaseVersionRow.family_id)
                .where(BaseVersionRow.source_kind == "local")
            ).all()
            derived = s.execute(select(DerivedModelRow.id, DerivedModelRow.path)).all()
        out = [(Path(src), f"the directory of registered base {fam}@{ver}") for fam, ver, src in bases]
        out += [
            (Path(p), f"the directory of registered model derived:{i} (remove it first: `patchlab rm derived:{i}`)")
            for i, p in derived
        ]
        return out

    def _journal_entries(self) -> list[tuple[Path, dict]]:
        out = []
        if self.journal.is_dir():
            for f in sorted(self.journal.glob("*.json")):
                with contextlib.suppress(OSError, ValueError):
                    out.append((f, json.loads(f.read_text())))
        return out

    def known_outputs(self) -> list[Path]:
        """Outputs this registry knows of: the ones commands noted before writing, and derived models."""
        with self.db.read() as s:
            derived = [Path(p) for p in s.execute(select(DerivedModelRow.path)).scalars()]
        noted = [Path(e["path"]) for _, e in self._journal_entries() if isinstance(e.get("path"), str)]
        return list(dict.fromkeys(noted + derived))

    def leftovers(self, grace_seconds: float = 3600.0, scratch_root: Path | None = None) -> list[Leftover]:
        """Partial outputs beside known outputs, and scratch copies, whose writer is gone."""
        return stale_partials(self.known_outputs(), grace_seconds) + stale_scratch(
            scratch_root, SCRATCH_PREFIXES, grace_seconds
        )

    def orphans(self) -> list[Path]:
        """Complete outputs written for this registry whose command was killed before recording them."""
        home = str(self.home)
        with self.db.read() as s:
            derived = {str(Path(p)) for p in s.execute(select(DerivedModelRow.path)).scalars()}
        found = []
        for p in self.known_outputs():
            if str(p) in derived:
                continue
            if is_orphan(read_marker(p), None, home):
                found.append(p)
        return found

    def prune_journal(self) -> int:
        """Forget noted outputs whose command is gone and left nothing partial behind; returns how many."""
        n = 0
        for f, e in self._journal_entries():
            if owner_alive(e) is True:
                continue
            p = Path(e.get("path", ""))
            if stale_partials([p], 0.0) or is_orphan(read_marker(p), None, str(self.home)):
                continue
            with contextlib.suppress(OSError):
                f.unlink()
                n += 1
        return n
