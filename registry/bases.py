"""Base versions: recorded by location and fingerprint (weights are never copied), listed, located."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from patchlab.digests import CONTENT_ALGORITHM, content_algorithm, same_algorithm, short_digest
from patchlab.errors import UnknownDigestError
from registry import refs
from registry.db import retry_locked
from registry.errors import AlreadyExistsError, BaseChangedError, InvalidReferenceError, UnknownReferenceError
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
        allow_nonfinite: bool = False,
        drift: bool = True,
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
        Local weights holding NaN/Inf are refused (unless ``allow_nonfinite``), and the sizes and modification
        times of a local base's files are recorded so a later change is caught before use.
        With ``drift`` (default) a fingerprinted release's drift from each older release that carries live
        patches is measured before anything is recorded, and recorded with it (``registry.drifts``): the
        upgrades and dry-run verdicts between the two then read neither base for it.
        """
        refs.validate_name(family, "family name")
        refs.validate_version_label(version)
        src = os.fspath(source)
        local = Path(src).expanduser()
        stats = None
        weights: Path | None = None  # the fingerprinted checkpoint, for the drift from older releases
        if revision is None and (local.exists() or refs.looks_like_path(src)):
            if not local.is_dir():
                raise UnknownReferenceError(
                    f"base checkpoint directory {local} does not exist; give an existing model directory "
                    "or a Hub repo id with --revision"
                )
            kind, src = "local", str(local.resolve())
            if fingerprint:
                facts = checkpoint_facts(local, allow_nonfinite=allow_nonfinite, label=f"{family}@{version}")
                stats = facts.get("file_stats")
                architecture = architecture or facts.get("architecture")
                content = content or facts.get("content")
                num_parameters = num_parameters if num_parameters is not None else facts.get("num_parameters")
                dtype = dtype or facts.get("dtype")
                vocab_size = vocab_size if vocab_size is not None else facts.get("vocab_size")
                weights = local
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
                    weights = path
            elif revision is not None and re.fullmatch(r"[0-9a-fA-F]{40}", revision):
                hub.validate_repo_id(src)  # a full sha is recorded as given: checked when first downloaded
                revision = revision.lower()
            else:
                revision = hub.resolve_revision(src, revision, endpoint=self.hub_endpoint, token=self.hub_token)
        drifts = self._drifts_for_new_release(family, version, release_order, weights) if drift and content else []

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
                    file_stats=stats,
                )
                s.add(bv)
                s.flush()
                for ref, measured in drifts:
                    try:
                        older = s.get(BaseVersionRow, refs.resolve_base(s, ref).id)
                    except UnknownReferenceError:  # removed meanwhile
                        continue
                    self._store_drift(s, older, bv, measured)  # type: ignore[attr-defined]
                return base_infos(s, [bv.id])[0]

        return retry_locked(run)

    def _drifts_for_new_release(
        self, family: str, version: str, release_order: int | None, weights: Path | None
    ) -> list[tuple[str, Any]]:
        """``(older release, BaseDrift)`` of a release being registered from ``weights``, from each older local
        release carrying live patches (``registry.drifts``); a pair that cannot be measured (an older release
        holding NaN/Inf) is left for the upgrade to measure, and to report."""
        from patchlab.errors import PatchlabError
        from registry.drifts import measure_release_drift

        known = self.list_bases(family)
        if weights is None or not known or any(b.version == version for b in known):
            return []  # nothing older; or a clash the registration refuses: measure nothing first
        order = release_order if release_order is not None else max(b.release_order for b in known) + 1
        out = []
        for ref, path in self._older_releases_in_use(family, order):  # type: ignore[attr-defined]
            try:
                out.append((ref, measure_release_drift(path, weights)))
            except PatchlabError:
                continue
        return out

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
            self.check_base_files(b.ref)
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

    def check_base_files(self, ref: str) -> None:
        """Cheap re-verification before a local base is used: its directory exists and every file recorded at
        registration has the same size and modification time. Raises ``BaseChangedError`` naming the base
        and the command that re-registers it."""
        with self.db.read() as s:
            bv = s.get(BaseVersionRow, refs.resolve_base(s, ref).id)
            label = refs.resolve_base(s, ref).label
            source, recorded = bv.source, bv.file_stats
        problem = base_file_problem(Path(source), recorded)
        if problem is not None:
            raise BaseChangedError(changed_message(label, source, problem))

    def refresh_base(self, ref: str) -> BaseInfo:
        """Re-hash a local base whose files were touched: when its content is what was registered, record
        its files' new sizes and times; when the weights changed, refuse (register them as a new version)."""
        b = self.get_base(ref)
        if b.source_kind != "local":
            raise InvalidReferenceError(f"base {b.ref} is a Hub base; only local bases are re-verified")
        algorithm = content_algorithm(b.content) if b.content else CONTENT_ALGORITHM  # the one it was recorded with
        facts = checkpoint_facts(Path(b.source), allow_nonfinite=True, label=b.ref, algorithm=algorithm)
        if b.content and facts["content"] != b.content:
            raise BaseChangedError(
                f"base {b.ref}: the weights in {b.source} are no longer the ones registered (content "
                f"{short_digest(b.content)} -> {short_digest(facts['content'])}); restore the original files, "
                "or register these "
                f"as a new version: `patchlab base add {b.family}@NEW {b.source}`"
            )

        def run() -> BaseInfo:
            with self.db.write() as s:
                bv = s.get(BaseVersionRow, b.id)
                bv.file_stats = facts["file_stats"]
                if bv.content is None:
                    bv.content = facts["content"]
                s.flush()
                return base_infos(s, [b.id])[0]

        return retry_locked(run)

    def verify_bases(self, *, full: bool = False) -> list[tuple[str, str]]:
        """(base, problem) for every local base whose directory is gone or whose files changed since
        registration; ``full`` also re-hashes the weights against the recorded content fingerprint."""
        with self.db.read() as s:
            rows = s.execute(
                select(
                    FamilyRow.name,
                    BaseVersionRow.version,
                    BaseVersionRow.source,
                    BaseVersionRow.file_stats,
                    BaseVersionRow.content,
                )
                .join(FamilyRow, FamilyRow.id == BaseVersionRow.family_id)
                .where(BaseVersionRow.source_kind == "local")
                .order_by(FamilyRow.name, BaseVersionRow.release_order)
            ).all()
        out: list[tuple[str, str]] = []
        for fam, ver, src, stats, content in rows:
            label = refs.base_label(fam, ver)
            problem = base_file_problem(Path(src), stats)
            if problem is None and full and content:
                from patchlab.errors import PatchlabError

                try:  # re-hashed with the algorithm the fingerprint was recorded with
                    algorithm = content_algorithm(content)
                    have = checkpoint_facts(
                        Path(src), allow_nonfinite=True, label=label, stats=False, algorithm=algorithm
                    )["content"]
                except PatchlabError as exc:
                    problem = f"cannot be read ({exc})"
                else:
                    if have != content:
                        problem = f"its weights changed (content {short_digest(content)} -> {short_digest(have)})"
            if problem is not None:
                out.append((label, problem))
        return out

    def content_matches(self, b: BaseInfo, want: str) -> bool | None:
        """Whether base ``b``'s weights have the content fingerprint ``want``: compared with its recorded one
        when both are of one algorithm, else re-hashed with ``want``'s algorithm when its weights are on this
        machine (a local base unchanged on disk, a Hub base in the cache) and still hash to its recorded
        fingerprint; None when it cannot be told."""
        if not b.content:
            return None
        if same_algorithm(b.content, want):
            return b.content == want
        try:
            content_algorithm(want)
        except UnknownDigestError:
            return None
        path = self._weights_here(b)
        if path is None:
            return None
        from patchlab.io.checkpoint import Checkpoint  # lazy: torch

        ck = Checkpoint.open(path)  # the weights there must still be the registered ones, and hash to want
        return ck.content_digest_like(b.content) == b.content and ck.content_digest_like(want) == want

    def find_base_by_content(self, want: str) -> BaseInfo | None:
        """The registered base whose weights have the content fingerprint ``want``: one recorded with it, else
        one recorded with another algorithm (older or newer fingerprints) whose weights hash to ``want``."""
        bases = self.list_bases()
        hit = next((b for b in bases if b.content == want), None)
        if hit is not None:
            return hit
        return next(
            (b for b in bases if b.content and not same_algorithm(b.content, want) and self.content_matches(b, want)),
            None,
        )

    def _weights_here(self, b: BaseInfo) -> Path | None:
        """The directory of a base's weights when they are on this machine as registered, else None."""
        if b.source_kind == "local":
            return Path(b.source) if base_file_problem(Path(b.source), self._file_stats(b.id)) is None else None
        from patchlab.io import hub

        return hub.cached_checkpoint(b.source, b.revision or "main")

    def _file_stats(self, base_id: int) -> dict[str, list[int]] | None:
        with self.db.read() as s:
            bv = s.get(BaseVersionRow, base_id)
            return bv.file_stats if bv is not None else None

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


def checkpoint_facts(
    path: Path,
    *,
    allow_nonfinite: bool = False,
    label: str = "",
    stats: bool = True,
    algorithm: str = CONTENT_ALGORITHM,
) -> dict[str, Any]:
    """Fingerprint and facts of a local checkpoint (``patchlab.io.checkpoint``), its files' sizes and
    times, and a refusal of NaN/Inf weights (unless ``allow_nonfinite``), found in the same read as the
    content digest (of ``algorithm``: a recorded fingerprint is re-verified with its own)."""
    from patchlab.errors import NonFiniteError
    from patchlab.io.checkpoint import Checkpoint  # lazy: torch is not needed to list a registry

    ck = Checkpoint.open(path)
    file_stats = file_stats_of(path, ck.weight_files()) if stats else None  # before reading: a race shows
    scan = ck.scan(algorithm, check_finite=not allow_nonfinite)
    if scan.nonfinite:
        raise NonFiniteError(
            f"base {label or path}: {', '.join(scan.nonfinite[:5])} in {path} hold NaN/Inf; a port or apply onto "
            "it would write non-finite weights. Fix the checkpoint, or pass --allow-nonfinite if it is meant"
        )
    return {
        "architecture": ck.architecture_digest,
        "content": scan.digest,
        "num_parameters": ck.num_parameters,
        "dtype": str(ck.dtype),
        "vocab_size": ck.vocab_size,
        "file_stats": file_stats,
    }


STAT_EXTRA = ("config.json",)


def file_stats_of(path: Path, weight_files: Sequence[str]) -> dict[str, list[int]]:
    """``{file: [size, mtime_ns]}`` of a checkpoint's weight files (and its config)."""
    out: dict[str, list[int]] = {}
    for name in [*weight_files, *STAT_EXTRA]:
        p = path / name
        if p.is_file():
            st = p.stat()
            out[name] = [st.st_size, st.st_mtime_ns]
    return out


def base_file_problem(path: Path, recorded: dict[str, list[int]] | None) -> str | None:
    """What changed in a local base's directory since its files were recorded (None: nothing seen)."""
    if not path.is_dir():
        return f"its directory {path} is gone"
    if not recorded:
        return None
    for name, (size, mtime_ns) in sorted(recorded.items()):
        try:
            st = (path / name).stat()
        except OSError:
            return f"{name} is gone"
        if st.st_size != size:
            return f"{name} changed size ({size} -> {st.st_size} bytes)"
        if st.st_mtime_ns != mtime_ns:
            return f"{name} was modified after registration"
    return None


def changed_message(label: str, source: str, problem: str) -> str:
    family = label.rsplit("@", 1)[0]
    return (
        f"base {label} changed on disk since it was registered: {problem}; a patch made on it would no longer "
        f"reproduce its fine-tune. If only the file times changed, re-verify it with `patchlab base refresh "
        f"{label}`; if the weights changed, register them as a new version: `patchlab base add {family}@NEW "
        f"{source}`"
    )
