"""Base versions: recorded by location and fingerprint (weights are never copied), listed, located."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry import refs
from registry.db import retry_locked
from registry.errors import AlreadyExistsError, UnknownReferenceError
from registry.records import BaseInfo, timestamp
from registry.rows import AliasRow, BaseVersionRow, FamilyRow, TagRow
from registry.topic import Topic, group


class Bases(Topic):
    def add_base(
        self,
        family: str,
        version: str,
        source: str | os.PathLike[str],
        *,
        revision: str | None = None,
        architecture: str | None = None,
        content: str | None = None,
        num_parameters: int | None = None,
        dtype: str | None = None,
        vocab_size: int | None = None,
        release_order: int | None = None,
        fingerprint: bool = True,
        download: bool = True,
    ) -> BaseInfo:
        """Record a base version by location and fingerprint (its weights are never copied).

        ``source`` is a local checkpoint directory, or a Hub repo id (``org/name``). For a Hub repo the
        ``revision`` (branch, tag or sha; default ``main``) is resolved to its commit sha, which is what is
        recorded (``org/name@sha``); what a checkpoint needs is downloaded into the Hugging Face cache and
        fingerprinted by the same code as a local directory. With ``download=False`` only the sha is recorded:
        the first operation that needs the weights (``checkpoint_path``) downloads and fingerprints them; a full
        40-hex sha is then recorded without asking the Hub (it is checked by that first download).
        For a local directory the fingerprint, parameter count, dtype and vocabulary come from ``Checkpoint``
        unless given.
        """
        refs.validate_name(family, "family name")
        refs.validate_version_label(version)
        src = os.fspath(source)
        local = Path(src).expanduser()
        if revision is None and (local.exists() or refs.looks_like_path(src)):
            if not local.is_dir():
                raise UnknownReferenceError(
                    f"base checkpoint directory {local} does not exist; give an existing model directory "
                    "or a Hub repo id with --revision"
                )
            kind, src = "local", str(local.resolve())
            if fingerprint:
                facts = checkpoint_facts(local)
                architecture = architecture or facts.get("architecture")
                content = content or facts.get("content")
                num_parameters = num_parameters if num_parameters is not None else facts.get("num_parameters")
                dtype = dtype or facts.get("dtype")
                vocab_size = vocab_size if vocab_size is not None else facts.get("vocab_size")
        else:
            from patchlab.io import hub

            kind = "hub"
            if download:
                path = hub.download_checkpoint(
                    src, revision, progress=self.hub_progress, endpoint=self.hub_endpoint, token=self.hub_token
                )
                revision = path.name  # the snapshot folder is named by the commit sha
                if fingerprint:
                    facts = checkpoint_facts(path)
                    architecture = architecture or facts.get("architecture")
                    content = content or facts.get("content")
                    num_parameters = num_parameters if num_parameters is not None else facts.get("num_parameters")
                    dtype = dtype or facts.get("dtype")
                    vocab_size = vocab_size if vocab_size is not None else facts.get("vocab_size")
            elif revision is not None and re.fullmatch(r"[0-9a-fA-F]{40}", revision):
                hub.validate_repo_id(src)  # a full sha is recorded as given: checked when first downloaded
                revision = revision.lower()
            else:
                revision = hub.resolve_revision(src, revision, endpoint=self.hub_endpoint, token=self.hub_token)

        def run() -> BaseInfo:
            with self.db.write() as s:
                fam = s.execute(select(FamilyRow).where(FamilyRow.name == family)).scalar_one_or_none()
                if fam is None:
                    fam = FamilyRow(name=family)
                    s.add(fam)
                    s.flush()
                clash = s.execute(
                    select(BaseVersionRow.id).where(
                        BaseVersionRow.family_id == fam.id, BaseVersionRow.version == version
                    )
                ).first()
                if clash is not None:
                    raise AlreadyExistsError(
                        f"base {family}@{version} is already registered; pick another version label or "
                        f"`patchlab rm {family}@{version}` first"
                    )
                order = release_order
                if order is None:
                    top = s.execute(
                        select(func.max(BaseVersionRow.release_order)).where(BaseVersionRow.family_id == fam.id)
                    ).scalar_one()
                    order = (top or 0) + 1
                bv = BaseVersionRow(
                    family_id=fam.id,
                    version=version,
                    source_kind=kind,
                    source=src,
                    revision=revision,
                    architecture=architecture,
                    content=content,
                    num_parameters=num_parameters,
                    dtype=dtype,
                    vocab_size=vocab_size,
                    release_order=order,
                )
                s.add(bv)
                s.flush()
                return base_infos(s, [bv.id])[0]

        return retry_locked(run)

    def get_base(self, ref: str) -> BaseInfo:
        with self.db.read() as s:
            return base_infos(s, [refs.resolve_base(s, ref).id])[0]

    def list_bases(self, family: str | None = None) -> list[BaseInfo]:
        with self.db.read() as s:
            q = select(BaseVersionRow.id).join(FamilyRow, FamilyRow.id == BaseVersionRow.family_id)
            if family is not None:
                q = q.where(FamilyRow.name == family)
            ids = list(s.execute(q.order_by(FamilyRow.name, BaseVersionRow.release_order)).scalars())
            return base_infos(s, ids)

    def checkpoint_path(self, ref_or_path: str | os.PathLike[str]) -> Path:
        """A local directory for a checkpoint: a plain path as given, else the base version's directory.

        For a Hub base, its snapshot in the local Hugging Face cache; when it is not there yet (a base added
        with ``download=False``, or a cleared cache) it is downloaded now, and a base recorded without a
        fingerprint gets one. Offline (``HF_HUB_OFFLINE=1``) only the cache answers.
        """
        if refs.looks_like_path(ref_or_path):
            return Path(ref_or_path).expanduser()
        b = self.get_base(os.fspath(ref_or_path))
        if b.source_kind != "hub":
            return Path(b.source)
        return self._hub_checkpoint(b)

    def _hub_checkpoint(self, b: BaseInfo) -> Path:
        from patchlab.io import hub

        path = hub.cached_checkpoint(b.source, b.revision or "main")
        if path is None:
            path = hub.download_checkpoint(
                b.source, b.revision, progress=self.hub_progress, endpoint=self.hub_endpoint, token=self.hub_token
            )
        if b.content is None:
            self._fill_facts(b, checkpoint_facts(path))
        return path

    def _fill_facts(self, b: BaseInfo, facts: dict[str, Any]) -> None:
        """Record the fingerprint and facts of a base that was added without them (lazily, from the Hub)."""

        def run() -> None:
            with self.db.write() as s:
                bv = s.get(BaseVersionRow, b.id)
                if bv is None or bv.content is not None:
                    return
                bv.architecture = bv.architecture or facts.get("architecture")
                bv.content = facts.get("content")
                bv.num_parameters = bv.num_parameters if bv.num_parameters is not None else facts.get("num_parameters")
                bv.dtype = bv.dtype or facts.get("dtype")
                bv.vocab_size = bv.vocab_size if bv.vocab_size is not None else facts.get("vocab_size")

        retry_locked(run)

    def checkpoint_location(self, ref_or_path: str | os.PathLike[str]) -> str:
        """Where a checkpoint is: a plain path as given, else the base version's path (or Hub id@rev)."""
        if refs.looks_like_path(ref_or_path):
            return os.fspath(ref_or_path)
        return self.get_base(os.fspath(ref_or_path)).location


def base_infos(s: Session, ids: Sequence[int]) -> list[BaseInfo]:
    """The records of these base version ids, in the order given (unknown ids left out)."""
    if not ids:
        return []
    rows = s.execute(
        select(BaseVersionRow, FamilyRow.name)
        .join(FamilyRow, FamilyRow.id == BaseVersionRow.family_id)
        .where(BaseVersionRow.id.in_(ids))
    ).all()
    tags = group(s.execute(select(TagRow.base_version_id, TagRow.tag).where(TagRow.base_version_id.in_(ids))).all())
    aliases = group(
        s.execute(select(AliasRow.base_version_id, AliasRow.name).where(AliasRow.base_version_id.in_(ids))).all()
    )
    by_id = {
        bv.id: BaseInfo(
            id=bv.id,
            family=fam,
            version=bv.version,
            source_kind=bv.source_kind,
            source=bv.source,
            revision=bv.revision,
            architecture=bv.architecture,
            content=bv.content,
            num_parameters=bv.num_parameters,
            dtype=bv.dtype,
            vocab_size=bv.vocab_size,
            release_order=bv.release_order,
            created_at=timestamp(bv.created_at),
            tags=tuple(sorted(tags.get(bv.id, ()))),
            aliases=tuple(sorted(aliases.get(bv.id, ()))),
        )
        for bv, fam in rows
    }
    return [by_id[i] for i in ids if i in by_id]


def checkpoint_facts(path: Path) -> dict[str, Any]:
    """Fingerprint and facts of a local checkpoint (``patchlab.io.checkpoint``)."""
    from patchlab.io.checkpoint import Checkpoint  # lazy: torch is not needed to list a registry

    ck = Checkpoint.open(path)
    fp = ck.fingerprint()
    return {
        "architecture": fp.architecture,
        "content": fp.content,
        "num_parameters": ck.num_parameters,
        "dtype": str(ck.dtype),
        "vocab_size": ck.vocab_size,
    }
