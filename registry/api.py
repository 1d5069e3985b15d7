"""``Registry``: the Python API over the registry database and blob store (the CLI is a thin shell on it)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from patchlab.errors import PatchFormatError
from registry import refs
from registry.blobs import BlobStore, sha256_file, tree_digest, tree_listing
from registry.db import Database, Location, open_database, resolve_location, retry_locked
from registry.errors import (
    AlreadyExistsError,
    DependencyError,
    InvalidReferenceError,
    ManifestError,
    UnknownReferenceError,
)
from registry.models import (
    Alias,
    BaseVersion,
    DerivedModel,
    Evaluation,
    EvaluationResult,
    Family,
    Patch,
    PatchFile,
    PatchParent,
    Tag,
    utcnow,
)

MANIFEST = "patch.json"
RECORD_KEYS = ("id", "prediction", "gold", "correct", "score")
PARENT_RELATIONS = ("port", "merge", "derived")


# ---- records returned to callers (plain values, detached from any session) ----------------------


@dataclass(frozen=True)
class BaseInfo:
    id: int
    family: str
    version: str
    source_kind: str
    source: str
    revision: str | None
    architecture: str | None
    content: str | None
    num_parameters: int | None
    dtype: str | None
    vocab_size: int | None
    release_order: int
    created_at: str
    tags: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.family}@{self.version}"

    @property
    def location(self) -> str:
        """A local path, or ``repo_id@revision`` for a Hub source."""
        if self.source_kind == "hub" and self.revision:
            return f"{self.source}@{self.revision}"
        return self.source

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, **_shallow(self)}


@dataclass(frozen=True)
class PatchInfo:
    id: int
    name: str
    version: int
    digest: str
    size: int
    base: str | None
    base_version_id: int | None
    base_architecture: str | None
    base_content: str | None
    finetuned: str | None
    encoding: str | None
    method: str | None
    parameters: Any
    num_tensors: int
    format_version: str | None
    description: str | None
    created_at: str
    tags: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    parents: tuple[tuple[str, str], ...] = ()  # (parent ref, relation)
    stats: Any = None  # per-tensor statistics, filled by get_patch(..., detail=True)
    totals: Any = None
    files: tuple[tuple[str, str, int], ...] = ()  # (name, digest, size), filled with detail=True

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d = {"ref": self.ref, **_shallow(self)}
        d["parents"] = [{"ref": r, "relation": rel} for r, rel in self.parents]
        d["files"] = [{"name": n, "digest": dg, "size": sz} for n, dg, sz in self.files]
        return d


@dataclass(frozen=True)
class DerivedInfo:
    id: int
    patch: str
    base: str | None
    kind: str
    path: str
    parameters: Any
    content: str | None
    created_at: str

    @property
    def ref(self) -> str:
        return f"derived:{self.id}"

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, **_shallow(self)}


@dataclass(frozen=True)
class AliasInfo:
    name: str
    scope_kind: str
    scope: str
    target: str

    @property
    def ref(self) -> str:
        return f"{self.scope}@{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, **_shallow(self)}


@dataclass(frozen=True)
class EvaluationInfo:
    id: int
    target: str
    model: str
    dataset: str
    metrics: Any
    num_instances: int
    created_at: str
    results: tuple[dict[str, Any], ...] = ()
    settings: Any = None

    def to_dict(self) -> dict[str, Any]:
        d = _shallow(self)
        d["results"] = list(self.results)
        return d


@dataclass
class LineageNode:
    """A patch and the patches it came from (recursively): ``relation`` is how it came from its child."""

    ref: str
    digest: str
    base: str | None
    relation: str | None = None
    parents: list[LineageNode] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "digest": self.digest,
            "base": self.base,
            "relation": self.relation,
            "parents": [p.to_dict() for p in self.parents],
        }


@dataclass(frozen=True)
class BlobProblem:
    digest: str
    state: str  # "missing" | "damaged"
    patches: tuple[str, ...]


@dataclass(frozen=True)
class VerifyReport:
    checked: int
    problems: tuple[BlobProblem, ...]
    missing_bases: tuple[str, ...]  # local base versions whose directory is gone

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "problems": [_shallow(p) for p in self.problems],
            "missing_bases": list(self.missing_bases),
        }


@dataclass(frozen=True)
class GcReport:
    removed: tuple[str, ...]
    freed_bytes: int
    kept: int
    skipped_young: int
    dry_run: bool

    def to_dict(self) -> dict[str, Any]:
        return _shallow(self)


def _shallow(obj: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict, without ``asdict``'s deep copy (10x faster over 10,000 rows)."""
    return {k: (list(v) if type(v) is tuple else v) for k, v in vars(obj).items()}


def _ts(dt) -> str:
    return dt.isoformat(timespec="seconds") + "Z" if dt is not None else ""


def _json_safe(value: Any, what: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidReferenceError(f"{what} must be JSON-serialisable: {exc}") from None
    return value


# ---- the registry ------------------------------------------------------------------------------


class Registry:
    """A registry of base versions, patches, derived models, aliases, tags and evaluations.

    ``Registry()`` opens the default registry (``$PATCHLAB_HOME`` or the user data dir); pass a directory,
    a ``.db`` file or a SQLAlchemy URL to open another. ``create=True`` (or :meth:`init`) makes it if absent.
    Opening a registry made by an older patchlab upgrades its schema; a newer one is refused.
    """

    def __init__(self, url_or_path: str | os.PathLike[str] | None = None, *, create: bool = False) -> None:
        self.location: Location = resolve_location(url_or_path)
        self.db: Database = open_database(self.location, create=create)
        self.home: Path = self.location.home
        self.blobs = BlobStore(self.home / "blobs")
        self.cache = self.home / "cache"

    @classmethod
    def init(cls, url_or_path: str | os.PathLike[str] | None = None) -> Registry:
        """Create the registry (idempotent: an existing one is opened, and upgraded if older)."""
        reg = cls(url_or_path, create=True)
        reg.blobs.objects.mkdir(parents=True, exist_ok=True)
        return reg

    def close(self) -> None:
        self.db.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({self.location.url!r})"

    # ---- bases ----------------------------------------------------------------------------------

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
    ) -> BaseInfo:
        """Record a base version by location and fingerprint (its weights are never copied).

        ``source`` is a local checkpoint directory, or a Hub repo id (then give ``revision``). For a
        local directory the fingerprint, parameter count, dtype and vocabulary come from ``Checkpoint``
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
                facts = _checkpoint_facts(local)
                architecture = architecture or facts.get("architecture")
                content = content or facts.get("content")
                num_parameters = num_parameters if num_parameters is not None else facts.get("num_parameters")
                dtype = dtype or facts.get("dtype")
                vocab_size = vocab_size if vocab_size is not None else facts.get("vocab_size")
        else:
            if revision is None:
                raise InvalidReferenceError(
                    f"{src!r} is neither an existing directory nor pinned: for a Hub repo id pass a revision "
                    "(a commit hash or tag) so the base is reproducible"
                )
            kind = "hub"

        def run() -> BaseInfo:
            with self.db.write() as s:
                fam = s.execute(select(Family).where(Family.name == family)).scalar_one_or_none()
                if fam is None:
                    fam = Family(name=family)
                    s.add(fam)
                    s.flush()
                clash = s.execute(
                    select(BaseVersion.id).where(BaseVersion.family_id == fam.id, BaseVersion.version == version)
                ).first()
                if clash is not None:
                    raise AlreadyExistsError(
                        f"base {family}@{version} is already registered; pick another version label or "
                        f"`patchlab rm {family}@{version}` first"
                    )
                order = release_order
                if order is None:
                    top = s.execute(
                        select(func.max(BaseVersion.release_order)).where(BaseVersion.family_id == fam.id)
                    ).scalar_one()
                    order = (top or 0) + 1
                bv = BaseVersion(
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
                return self._base_infos(s, [bv.id])[0]

        return retry_locked(run)

    def get_base(self, ref: str) -> BaseInfo:
        with self.db.read() as s:
            return self._base_infos(s, [refs.resolve_base(s, ref).id])[0]

    def list_bases(self, family: str | None = None) -> list[BaseInfo]:
        with self.db.read() as s:
            q = select(BaseVersion.id).join(Family, Family.id == BaseVersion.family_id)
            if family is not None:
                q = q.where(Family.name == family)
            ids = list(s.execute(q.order_by(Family.name, BaseVersion.release_order)).scalars())
            return self._base_infos(s, ids)

    def list_families(self) -> list[str]:
        with self.db.read() as s:
            return list(s.execute(select(Family.name).order_by(Family.name)).scalars())

    def checkpoint_path(self, ref_or_path: str | os.PathLike[str]) -> Path:
        """A local directory for a checkpoint: a plain path as given, else the base version's directory;
        for a Hub base, its snapshot in the local Hugging Face cache (never downloads)."""
        if refs.looks_like_path(ref_or_path):
            return Path(ref_or_path).expanduser()
        b = self.get_base(os.fspath(ref_or_path))
        if b.source_kind != "hub":
            return Path(b.source)
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(b.source, revision=b.revision, local_files_only=True))
        except Exception as exc:  # LocalEntryNotFoundError and friends: not in the local cache
            from patchlab.errors import CheckpointNotFoundError

            raise CheckpointNotFoundError(
                f"base {b.ref} is the Hub repo {b.location}, which is not in the local Hugging Face cache "
                f"({type(exc).__name__}); download it first: `huggingface-cli download {b.source} --revision "
                f"{b.revision}`, or pass a local directory"
            ) from None

    def checkpoint_location(self, ref_or_path: str | os.PathLike[str]) -> str:
        """Where a checkpoint is: a plain path as given, else the base version's path (or Hub id@rev)."""
        if refs.looks_like_path(ref_or_path):
            return os.fspath(ref_or_path)
        return self.get_base(os.fspath(ref_or_path)).location

    def _base_infos(self, s: Session, ids: Sequence[int]) -> list[BaseInfo]:
        if not ids:
            return []
        rows = s.execute(
            select(BaseVersion, Family.name)
            .join(Family, Family.id == BaseVersion.family_id)
            .where(BaseVersion.id.in_(ids))
        ).all()
        tags = _group(s.execute(select(Tag.base_version_id, Tag.tag).where(Tag.base_version_id.in_(ids))).all())
        aliases = _group(
            s.execute(select(Alias.base_version_id, Alias.name).where(Alias.base_version_id.in_(ids))).all()
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
                created_at=_ts(bv.created_at),
                tags=tuple(sorted(tags.get(bv.id, ()))),
                aliases=tuple(sorted(aliases.get(bv.id, ()))),
            )
            for bv, fam in rows
        }
        return [by_id[i] for i in ids if i in by_id]

    # ---- patches --------------------------------------------------------------------------------

    def add_patch(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        base: str | None = None,
        parents: Iterable[str] = (),
        relation: str = "port",
        description: str | None = None,
        tags: Iterable[str] = (),
        require_base: bool = True,
    ) -> PatchInfo:
        """Store a patch directory's files as blobs and register it as ``name@<next version>``.

        Provenance and statistics come from its ``patch.json``. The base version it was made on is ``base``
        if given, else the registered base whose content fingerprint matches the manifest's. ``parents``
        (patch references) record what a ported/merged patch came from, with ``relation``. Registering the
        same content under the same name again returns the existing version.
        """
        src = Path(path).expanduser()
        manifest = read_manifest(src)
        prov = manifest.get("provenance") or {}
        base_prov = prov.get("base") or {}
        ft_prov = prov.get("finetuned") or {}
        if name is None:
            name = _default_name(src, ft_prov)
        refs.validate_name(name)
        if relation not in PARENT_RELATIONS:
            raise InvalidReferenceError(f"relation must be one of {', '.join(PARENT_RELATIONS)}, not {relation!r}")
        parents = list(parents)
        tags = [refs.validate_name(t, "tag") for t in tags]
        tensors = manifest.get("tensors") or {}
        encodings = sorted({str(t.get("encoding", "dense")) for t in tensors.values() if isinstance(t, dict)})
        encoding = encodings[0] if len(encodings) == 1 else ("mixed" if encodings else None)
        stats = {
            k: {key: t.get(key) for key in ("op", "encoding", "shape", "dtype", "stats") if key in t}
            for k, t in tensors.items()
            if isinstance(t, dict)
        }

        # 1. blobs first: a row must never point at a blob that is not there
        files: dict[str, tuple[str, int]] = {}
        for rel in _patch_files(src):
            files[rel] = self.blobs.put_file(src / rel)
        listing = {k: v[0] for k, v in files.items()}
        digest = tree_digest(listing)
        self.blobs.put_bytes(tree_listing(listing))
        size = sum(v[1] for v in files.values())

        # 2. then the row, in one short write transaction
        def run() -> PatchInfo:
            with self.db.write() as s:
                same = s.execute(select(Patch.id).where(Patch.name == name, Patch.digest == digest)).first()
                if same is not None:  # re-registering: no new version; given parents and tags are added
                    self._link(s, same[0], [refs.resolve_patch(s, p).id for p in parents], relation, tags)
                    return self._patch_infos(s, [same[0]])[0]
                base_id = self._match_base(s, base, base_prov, src, require_base)
                parent_ids = [refs.resolve_patch(s, p).id for p in parents]
                top = s.execute(select(func.max(Patch.version)).where(Patch.name == name)).scalar_one()
                row = Patch(
                    name=name,
                    version=(top or 0) + 1,
                    digest=digest,
                    size=size,
                    base_version_id=base_id,
                    base_architecture=base_prov.get("architecture"),
                    base_content=base_prov.get("content"),
                    finetuned=_source_text(ft_prov),
                    encoding=encoding,
                    method=prov.get("method"),
                    parameters=_json_safe(prov.get("parameters"), "parameters"),
                    num_tensors=len(tensors),
                    format_version=_opt_str(manifest.get("format_version")),
                    description=description,
                    totals=manifest.get("totals"),
                    stats=stats,
                )
                s.add(row)
                s.flush()
                s.execute(
                    insert(PatchFile),
                    [{"patch_id": row.id, "name": n, "digest": d, "size": sz} for n, (d, sz) in files.items()],
                )
                self._link(s, row.id, parent_ids, relation, tags)
                return self._patch_infos(s, [row.id])[0]

        def run_retrying_version() -> PatchInfo:
            for _ in range(5):  # a concurrent writer on a server database may take the same version number
                try:
                    return run()
                except IntegrityError as exc:
                    if "uq_patches_name_version" not in str(exc) and "patches.name" not in str(exc):
                        raise
            return run()

        return retry_locked(run_retrying_version)

    @staticmethod
    def _link(s: Session, patch_id: int, parent_ids: list[int], relation: str, tags: list[str]) -> None:
        """Add lineage edges and tags a patch does not have yet."""
        have = set(s.execute(select(PatchParent.parent_id).where(PatchParent.child_id == patch_id)).scalars())
        start = len(have)
        new = [pid for pid in dict.fromkeys(parent_ids) if pid not in have]
        if patch_id in new:
            raise InvalidReferenceError("a patch cannot be its own parent")
        if new:
            s.execute(
                insert(PatchParent),
                [
                    {"child_id": patch_id, "parent_id": pid, "relation": relation, "position": start + i}
                    for i, pid in enumerate(new)
                ],
            )
        have_tags = set(s.execute(select(Tag.tag).where(Tag.patch_id == patch_id)).scalars())
        new_tags = [t for t in dict.fromkeys(tags) if t not in have_tags]
        if new_tags:
            s.execute(insert(Tag), [{"tag": t, "patch_id": patch_id} for t in new_tags])

    def _match_base(
        self, s: Session, base: str | None, base_prov: Mapping[str, Any], src: Path, require: bool
    ) -> int | None:
        """The base version a patch was made on: ``base`` if given (checked against the manifest's
        fingerprints), else the registered base with the manifest's content fingerprint, else the
        registered local base at the manifest's base path with the same architecture."""
        want_content, want_arch = base_prov.get("content"), base_prov.get("architecture")
        if base is not None:
            target = refs.resolve_base(s, base)
            bv = s.get(BaseVersion, target.id)
            for what, want, have in (
                ("content", want_content, bv.content if bv else None),
                ("architecture", want_arch, bv.architecture if bv else None),
            ):
                if want and have and want != have:
                    raise InvalidReferenceError(
                        f"patch {src} was made on a base with {what} fingerprint {want[:12]}, but "
                        f"{target.label} has {have[:12]}; pass the base it was made on "
                        "(or omit --base to match by fingerprint)"
                    )
            return target.id
        if want_content:
            bid = s.execute(
                select(BaseVersion.id).where(BaseVersion.content == want_content).order_by(BaseVersion.id).limit(1)
            ).scalar_one_or_none()
            if bid is not None:
                return bid
        base_path = base_prov.get("path")
        if base_path:
            q = select(BaseVersion.id, BaseVersion.architecture).where(
                BaseVersion.source_kind == "local", BaseVersion.source == str(Path(base_path).resolve())
            )
            for bid, arch in s.execute(q.order_by(BaseVersion.id)).all():
                if not (want_arch and arch and arch != want_arch):
                    return bid
        if not require:
            return None
        hint = ", ".join(
            f"{k} {v[:12] if k != 'path' else v}"
            for k, v in (("content", want_content), ("architecture", want_arch), ("path", base_path))
            if v
        )
        raise UnknownReferenceError(
            f"patch {src} was made on a base that is not in the registry ({hint or 'no provenance'}); register "
            "it first with `patchlab base add FAMILY VERSION PATH`, or pass --base family@version"
        )

    def get_patch(self, ref: str, *, detail: bool = False) -> PatchInfo:
        with self.db.read() as s:
            return self._patch_infos(s, [refs.resolve_patch(s, ref).id], detail=detail)[0]

    def list_patches(
        self,
        *,
        name: str | None = None,
        base: str | None = None,
        family: str | None = None,
        tag: str | None = None,
        all_versions: bool = True,
        limit: int | None = None,
    ) -> list[PatchInfo]:
        """Patches, newest name/version last; a fixed number of queries whatever the count (no N+1)."""
        with self.db.read() as s:
            q = select(Patch.id)
            if name is not None:
                q = q.where(Patch.name == name)
            if base is not None:
                q = q.where(Patch.base_version_id == refs.resolve_base(s, base).id)
            if family is not None:
                q = (
                    q.join(BaseVersion, BaseVersion.id == Patch.base_version_id)
                    .join(Family, Family.id == BaseVersion.family_id)
                    .where(Family.name == family)
                )
            if tag is not None:
                q = q.where(Patch.id.in_(select(Tag.patch_id).where(Tag.tag == tag)))
            if not all_versions:
                latest = select(Patch.name, func.max(Patch.version).label("v")).group_by(Patch.name).subquery()
                q = q.join(latest, (latest.c.name == Patch.name) & (latest.c.v == Patch.version))
            if limit is not None:
                q = q.order_by(Patch.name, Patch.version).limit(limit)
            return self._patch_infos_q(s, q)

    def _patch_infos(self, s: Session, ids: Sequence[int], *, detail: bool = False) -> list[PatchInfo]:
        if not ids:
            return []
        return self._patch_infos_q(s, select(Patch.id).where(Patch.id.in_(list(ids))), detail=detail)

    def _patch_infos_q(self, s: Session, id_select, *, detail: bool = False) -> list[PatchInfo]:
        """PatchInfos of the patches ``id_select`` (a select of ``Patch.id``) picks, ordered by name and
        version: one query for the rows and one each for tags, aliases, parents (and files), whatever
        the count: the selection is a subquery, so no per-row queries and no huge parameter lists."""
        conn = s.connection()  # Core execution: these are plain column rows, no ORM loading needed
        sub = id_select.subquery()
        ids_in = select(sub.c.id)
        cols = [
            Patch.id,
            Patch.name,
            Patch.version,
            Patch.digest,
            Patch.size,
            Patch.base_version_id,
            Patch.base_architecture,
            Patch.base_content,
            Patch.finetuned,
            Patch.encoding,
            Patch.method,
            Patch.parameters,
            Patch.num_tensors,
            Patch.format_version,
            Patch.description,
            Patch.created_at,
            Family.name.label("family"),
            BaseVersion.version.label("base_version"),
        ]
        if detail:
            cols += [Patch.stats, Patch.totals]
        rows = conn.execute(
            select(*cols)
            .join(sub, sub.c.id == Patch.id)
            .outerjoin(BaseVersion, BaseVersion.id == Patch.base_version_id)
            .outerjoin(Family, Family.id == BaseVersion.family_id)
            .order_by(Patch.name, Patch.version)
        ).all()
        tags = _group(conn.execute(select(Tag.patch_id, Tag.tag).where(Tag.patch_id.in_(ids_in))).all())
        aliases = _group(conn.execute(select(Alias.patch_id, Alias.name).where(Alias.patch_id.in_(ids_in))).all())
        parents: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for child, pname, pver, rel in conn.execute(
            select(PatchParent.child_id, Patch.name, Patch.version, PatchParent.relation)
            .join(Patch, Patch.id == PatchParent.parent_id)
            .where(PatchParent.child_id.in_(ids_in))
            .order_by(PatchParent.child_id, PatchParent.position)
        ).all():
            parents[child].append((f"{pname}@{pver}", rel))
        files: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
        if detail:
            for pid, n, dg, sz in conn.execute(
                select(PatchFile.patch_id, PatchFile.name, PatchFile.digest, PatchFile.size)
                .where(PatchFile.patch_id.in_(ids_in))
                .order_by(PatchFile.name)
            ).all():
                files[pid].append((n, dg, sz))
        out = []
        for r in rows:
            out.append(
                PatchInfo(
                    id=r.id,
                    name=r.name,
                    version=r.version,
                    digest=r.digest,
                    size=r.size,
                    base=f"{r.family}@{r.base_version}" if r.family is not None else None,
                    base_version_id=r.base_version_id,
                    base_architecture=r.base_architecture,
                    base_content=r.base_content,
                    finetuned=r.finetuned,
                    encoding=r.encoding,
                    method=r.method,
                    parameters=r.parameters,
                    num_tensors=r.num_tensors,
                    format_version=r.format_version,
                    description=r.description,
                    created_at=_ts(r.created_at),
                    tags=tuple(sorted(tags.get(r.id, ()))),
                    aliases=tuple(sorted(aliases.get(r.id, ()))),
                    parents=tuple(parents.get(r.id, ())),
                    stats=r.stats if detail else None,
                    totals=r.totals if detail else None,
                    files=tuple(files.get(r.id, ())),
                )
            )
        return out

    def patch_path(self, ref: str, *, verify: bool = True) -> Path:
        """Materialise a registered patch as a directory under the cache (hardlinks to verified blobs)."""
        info = self.get_patch(ref, detail=True)
        return self._materialise(info, verify=verify)

    def resolve_patch_path(self, ref_or_path: str | os.PathLike[str], *, verify: bool = True) -> Path:
        """A patch directory: a plain path as given, else the registered patch, materialised."""
        if refs.looks_like_path(ref_or_path):
            return Path(ref_or_path).expanduser()
        return self.patch_path(os.fspath(ref_or_path), verify=verify)

    def _materialise(self, info: PatchInfo, *, verify: bool) -> Path:
        final = self.cache / "patches" / info.digest
        listing = {n: dg for n, dg, _ in info.files}
        if tree_digest(listing) != info.digest:
            raise InvalidReferenceError(f"patch {info.ref}: its file list does not match its digest; run verify")
        if final.is_dir():
            present = {p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()}
            good = present == set(listing) and (
                not verify or all(sha256_file(final / n) == dg for n, dg in listing.items())
            )
            if good:
                return final
            shutil.rmtree(final, ignore_errors=True)
        tmp_root = self.cache / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=tmp_root, prefix=f"{info.digest[:12]}-"))
        try:
            for n, dg in listing.items():
                blob = self.blobs.open_path(dg, verify=verify)
                dest = tmp / n
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(blob, dest)
                except OSError:
                    shutil.copyfile(blob, dest)
            try:
                os.replace(tmp, final)
            except OSError:  # another process materialised it first
                if not final.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    # ---- derived models -------------------------------------------------------------------------

    def add_derived(
        self,
        patch: str,
        path: str | os.PathLike[str],
        *,
        base: str | None = None,
        kind: str = "apply",
        parameters: Mapping[str, Any] | None = None,
        content: str | None = None,
    ) -> DerivedInfo:
        """Record a model made by applying/porting ``patch`` onto ``base``; ``path`` is where it lives."""
        out = str(Path(path).expanduser().resolve())
        params = _json_safe(dict(parameters or {}), "parameters")

        def run() -> DerivedInfo:
            with self.db.write() as s:
                pid = refs.resolve_patch(s, patch).id
                bid = refs.resolve_base(s, base).id if base is not None else None
                row = DerivedModel(
                    patch_id=pid, base_version_id=bid, kind=kind, path=out, parameters=params, content=content
                )
                s.add(row)
                s.flush()
                return self._derived_infos(s, [row.id])[0]

        return retry_locked(run)

    def list_derived(self, patch: str | None = None) -> list[DerivedInfo]:
        with self.db.read() as s:
            q = select(DerivedModel.id).order_by(DerivedModel.id)
            if patch is not None:
                q = q.where(DerivedModel.patch_id == refs.resolve_patch(s, patch).id)
            return self._derived_infos(s, list(s.execute(q).scalars()))

    def get_derived(self, ref: str) -> DerivedInfo:
        with self.db.read() as s:
            return self._derived_infos(s, [refs.resolve_derived(s, ref).id])[0]

    def _derived_infos(self, s: Session, ids: Sequence[int]) -> list[DerivedInfo]:
        if not ids:
            return []
        rows = s.execute(
            select(DerivedModel, Patch.name, Patch.version, Family.name, BaseVersion.version)
            .join(Patch, Patch.id == DerivedModel.patch_id)
            .outerjoin(BaseVersion, BaseVersion.id == DerivedModel.base_version_id)
            .outerjoin(Family, Family.id == BaseVersion.family_id)
            .where(DerivedModel.id.in_(ids))
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
                created_at=_ts(d.created_at),
            )
            for d, pn, pv, fam, bver in rows
        }
        return [by_id[i] for i in ids if i in by_id]

    # ---- lineage --------------------------------------------------------------------------------

    def lineage(self, ref: str, *, max_depth: int = 64) -> LineageNode:
        """The tree of a patch's parents (ports v1 -> v2 -> v3, merges), one query per generation."""
        with self.db.read() as s:
            root_id = refs.resolve_patch(s, ref).id
            info: dict[int, tuple[str, str, str | None]] = {}
            edges: dict[int, list[tuple[int, str]]] = defaultdict(list)
            frontier, seen = {root_id}, set()
            for _ in range(max_depth):
                if not frontier:
                    break
                seen |= frontier
                for pid, n, v, dg, fam, bver in s.execute(
                    select(Patch.id, Patch.name, Patch.version, Patch.digest, Family.name, BaseVersion.version)
                    .outerjoin(BaseVersion, BaseVersion.id == Patch.base_version_id)
                    .outerjoin(Family, Family.id == BaseVersion.family_id)
                    .where(Patch.id.in_(frontier))
                ).all():
                    info[pid] = (f"{n}@{v}", dg, f"{fam}@{bver}" if fam else None)
                nxt = set()
                for child, parent, rel in s.execute(
                    select(PatchParent.child_id, PatchParent.parent_id, PatchParent.relation)
                    .where(PatchParent.child_id.in_(frontier))
                    .order_by(PatchParent.child_id, PatchParent.position)
                ).all():
                    edges[child].append((parent, rel))
                    if parent not in seen:
                        nxt.add(parent)
                frontier = nxt

        def build(pid: int, relation: str | None, path: frozenset[int]) -> LineageNode:
            ref_, dg, base = info[pid]
            node = LineageNode(ref_, dg, base, relation)
            for parent, rel in edges.get(pid, ()):
                if parent in info and parent not in path:
                    node.parents.append(build(parent, rel, path | {parent}))
            return node

        return build(root_id, None, frozenset({root_id}))

    # ---- aliases and tags -----------------------------------------------------------------------

    def set_alias(self, alias: str, target: str, *, kind: str | None = None) -> AliasInfo:
        """Point ``alias`` (scoped to the target's family or patch name) at ``target``; moves it if set."""
        refs.validate_name(alias, "alias")
        if alias.isdigit():
            raise InvalidReferenceError(f"alias {alias!r} would shadow a patch version number; use a word")

        def run() -> AliasInfo:
            with self.db.write() as s:
                t = refs.resolve_any(s, target, kind)
                if t.kind == "derived":
                    raise InvalidReferenceError("aliases name patches or base versions, not derived models")
                scope, _ = refs.split_ref(t.label)
                scope_kind = "family" if t.kind == "base" else "patch"
                if scope_kind == "family":
                    taken = s.execute(
                        select(BaseVersion.id)
                        .join(Family, Family.id == BaseVersion.family_id)
                        .where(Family.name == scope, BaseVersion.version == alias)
                    ).first()
                    if taken is not None:
                        raise AlreadyExistsError(
                            f"{scope}@{alias} is already a version label; choose another alias name"
                        )
                row = s.execute(
                    select(Alias).where(Alias.scope_kind == scope_kind, Alias.scope == scope, Alias.name == alias)
                ).scalar_one_or_none()
                target_cols = {
                    "base_version_id": t.id if t.kind == "base" else None,
                    "patch_id": t.id if t.kind == "patch" else None,
                }
                if row is None:
                    s.add(Alias(name=alias, scope_kind=scope_kind, scope=scope, **target_cols))
                else:
                    s.execute(update(Alias).where(Alias.id == row.id).values(updated_at=utcnow(), **target_cols))
                return AliasInfo(alias, scope_kind, scope, t.label)

        return retry_locked(run)

    def remove_alias(self, ref: str) -> AliasInfo:
        """Remove ``scope@alias`` (or a bare alias name used by exactly one scope)."""

        def run() -> AliasInfo:
            with self.db.write() as s:
                head, tail = refs.split_ref(ref)
                q = select(Alias)
                q = q.where(Alias.scope == head, Alias.name == tail) if tail else q.where(Alias.name == head)
                rows = list(s.execute(q).scalars())
                if not rows:
                    known = [f"{a.scope}@{a.name}" for a in s.execute(select(Alias)).scalars()]
                    raise UnknownReferenceError(
                        f"no alias {ref!r}{refs._close(ref, known)} (aliases: {', '.join(known) or 'none'})"
                    )
                if len(rows) > 1:
                    raise refs.AmbiguousReferenceError(
                        f"alias {ref!r} is set on " + ", ".join(f"{a.scope}@{a.name}" for a in rows) + "; say which"
                    )
                a = rows[0]
                label = self._target_label(s, a.base_version_id, a.patch_id)
                s.execute(delete(Alias).where(Alias.id == a.id))
                return AliasInfo(a.name, a.scope_kind, a.scope, label)

        return retry_locked(run)

    def list_aliases(self) -> list[AliasInfo]:
        with self.db.read() as s:
            rows = s.execute(select(Alias).order_by(Alias.scope_kind, Alias.scope, Alias.name)).scalars().all()
            return [
                AliasInfo(a.name, a.scope_kind, a.scope, self._target_label(s, a.base_version_id, a.patch_id))
                for a in rows
            ]

    def _target_label(self, s: Session, base_id: int | None, patch_id: int | None) -> str:
        if patch_id is not None:
            n, v = s.execute(select(Patch.name, Patch.version).where(Patch.id == patch_id)).one()
            return f"{n}@{v}"
        f, v = s.execute(
            select(Family.name, BaseVersion.version)
            .join(Family, Family.id == BaseVersion.family_id)
            .where(BaseVersion.id == base_id)
        ).one()
        return f"{f}@{v}"

    def add_tag(self, ref: str, tag: str, *, kind: str | None = None) -> str:
        """Tag a patch or base version; returns the resolved label. Tagging twice is a no-op."""
        refs.validate_name(tag, "tag")

        def run() -> str:
            with self.db.write() as s:
                t = refs.resolve_any(s, ref, kind)
                col = self._tag_col(t)
                if s.execute(select(Tag.id).where(Tag.tag == tag, col == t.id)).first() is None:
                    s.add(Tag(tag=tag, **{col.key: t.id}))
                return t.label

        return retry_locked(run)

    def remove_tag(self, ref: str, tag: str, *, kind: str | None = None) -> str:
        def run() -> str:
            with self.db.write() as s:
                t = refs.resolve_any(s, ref, kind)
                col = self._tag_col(t)
                n = s.execute(delete(Tag).where(Tag.tag == tag, col == t.id)).rowcount
                if not n:
                    have = list(s.execute(select(Tag.tag).where(col == t.id)).scalars())
                    raise UnknownReferenceError(
                        f"{t.label} has no tag {tag!r} (its tags: {', '.join(sorted(have)) or 'none'})"
                    )
                return t.label

        return retry_locked(run)

    @staticmethod
    def _tag_col(t: refs.Target):
        if t.kind == "patch":
            return Tag.patch_id
        if t.kind == "base":
            return Tag.base_version_id
        raise InvalidReferenceError("tags go on patches and base versions, not derived models")

    # ---- removal, gc, verify --------------------------------------------------------------------

    def rm(self, ref: str, *, kind: str | None = None, cascade: bool = False) -> list[str]:
        """Remove a patch, base version or derived model (blobs stay until :meth:`gc`).

        Refuses when child patches, derived models or aliases depend on it, listing them; with
        ``cascade`` those are removed too. Returns the labels of everything removed.
        """

        def run() -> list[str]:
            with self.db.write() as s:
                t = refs.resolve_any(s, ref, kind)
                if t.kind == "derived":
                    s.execute(delete(DerivedModel).where(DerivedModel.id == t.id))
                    return [t.label]
                if t.kind == "base":
                    patch_ids = set(s.execute(select(Patch.id).where(Patch.base_version_id == t.id)).scalars())
                    base_ids = {t.id}
                else:
                    patch_ids, base_ids = {t.id}, set()
                closure = _descendants(s, patch_ids)
                deps = self._dependants(s, closure, base_ids, root_patch=t.id if t.kind == "patch" else None)
                if deps and not cascade:
                    shown = ", ".join(deps[:10]) + (f" and {len(deps) - 10} more" if len(deps) > 10 else "")
                    raise DependencyError(
                        f"cannot remove {t.label}: {shown} depend on it; remove those first or pass "
                        "--cascade to remove them too"
                    )
                removed = [t.label] + deps
                derived_q = select(DerivedModel.id).where(
                    DerivedModel.patch_id.in_(closure) | DerivedModel.base_version_id.in_(base_ids)
                )
                s.execute(delete(DerivedModel).where(DerivedModel.id.in_(derived_q.scalar_subquery())))
                s.execute(delete(Alias).where(Alias.patch_id.in_(closure) | Alias.base_version_id.in_(base_ids)))
                if closure:
                    s.execute(
                        delete(PatchParent).where(
                            PatchParent.child_id.in_(closure) | PatchParent.parent_id.in_(closure)
                        )
                    )
                    s.execute(delete(Patch).where(Patch.id.in_(closure)))
                if base_ids:
                    fam_ids = set(
                        s.execute(select(BaseVersion.family_id).where(BaseVersion.id.in_(base_ids))).scalars()
                    )
                    s.execute(delete(BaseVersion).where(BaseVersion.id.in_(base_ids)))
                    for fid in fam_ids:
                        left = s.execute(select(BaseVersion.id).where(BaseVersion.family_id == fid).limit(1)).first()
                        if left is None:
                            s.execute(delete(Family).where(Family.id == fid))
                return removed

        return retry_locked(run)

    def _dependants(self, s: Session, closure: set[int], base_ids: set[int], root_patch: int | None) -> list[str]:
        out: list[str] = []
        for pid, n, v in s.execute(
            select(Patch.id, Patch.name, Patch.version).where(Patch.id.in_(closure)).order_by(Patch.name, Patch.version)
        ).all():
            if pid != root_patch:
                out.append(f"patch {n}@{v}")
        for (did,) in s.execute(
            select(DerivedModel.id).where(
                DerivedModel.patch_id.in_(closure) | DerivedModel.base_version_id.in_(base_ids)
            )
        ).all():
            out.append(f"derived model derived:{did}")
        for a in s.execute(
            select(Alias).where(Alias.patch_id.in_(closure) | Alias.base_version_id.in_(base_ids))
        ).scalars():
            out.append(f"alias {a.scope}@{a.name}")
        return out

    def referenced_digests(self) -> dict[str, list[str]]:
        """Every blob digest rows point at -> the patch labels that use it."""
        with self.db.read() as s:
            out: dict[str, list[str]] = defaultdict(list)
            for dg, n, v in s.execute(
                select(PatchFile.digest, Patch.name, Patch.version).join(Patch, Patch.id == PatchFile.patch_id)
            ).all():
                out[dg].append(f"{n}@{v}")
            for dg, n, v in s.execute(select(Patch.digest, Patch.name, Patch.version)).all():
                out[dg].append(f"{n}@{v}")
            return dict(out)

    def gc(self, *, grace_seconds: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Delete blobs no row refers to, older than ``grace_seconds`` (a patch being added right now
        writes its blobs before its row; the grace period keeps them). Also prunes stale cache entries."""
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
        return GcReport(tuple(removed), freed, kept, young, dry_run)

    def verify(self) -> VerifyReport:
        """Re-hash every referenced blob; report the missing or damaged ones and the patches they break."""
        referenced = self.referenced_digests()
        problems = []
        for dg in sorted(referenced):
            state = self.blobs.check(dg)
            if state != "ok":
                problems.append(BlobProblem(dg, state, tuple(sorted(set(referenced[dg])))))
        missing_bases = tuple(
            b.ref for b in self.list_bases() if b.source_kind == "local" and not Path(b.source).is_dir()
        )
        return VerifyReport(len(referenced), tuple(problems), missing_bases)

    # ---- evaluations ----------------------------------------------------------------------------

    def record_evaluation(
        self,
        target: str,
        dataset: str,
        records: Iterable[Mapping[str, Any]],
        *,
        metrics: Mapping[str, Any] | None = None,
        model: str | None = None,
        kind: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> EvaluationInfo:
        """Store an evaluation of a patch, base version or derived model: per-instance records
        ``{id, prediction, gold, correct, score}`` (other keys of a record are kept as its details) and
        aggregate metrics (accuracy and mean score unless given)."""
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        for i, rec in enumerate(records):
            if "id" not in rec:
                raise InvalidReferenceError(f"evaluation record {i} has no 'id'; every record needs a unique id")
            iid = str(rec["id"])
            if iid in seen:
                raise InvalidReferenceError(f"evaluation record id {iid!r} appears twice; ids must be unique")
            seen.add(iid)
            rows.append(
                {
                    "instance_id": iid,
                    "prediction": _json_safe(rec.get("prediction"), f"record {iid} prediction"),
                    "gold": _json_safe(rec.get("gold"), f"record {iid} gold"),
                    "correct": None if rec.get("correct") is None else bool(rec["correct"]),
                    "score": None if rec.get("score") is None else float(rec["score"]),
                    "details": _json_safe({k: v for k, v in rec.items() if k not in RECORD_KEYS}, f"record {iid}")
                    or None,
                    "position": i,
                }
            )
        agg = dict(metrics) if metrics is not None else _aggregate(rows)
        _json_safe(agg, "metrics")

        def run() -> EvaluationInfo:
            with self.db.write() as s:
                t = refs.resolve_any(s, target, kind)
                ev = Evaluation(
                    patch_id=t.id if t.kind == "patch" else None,
                    base_version_id=t.id if t.kind == "base" else None,
                    derived_id=t.id if t.kind == "derived" else None,
                    model=model or t.label,
                    dataset=dataset,
                    metrics=agg,
                    num_instances=len(rows),
                    settings=_json_safe(dict(settings), "settings") if settings is not None else None,
                )
                s.add(ev)
                s.flush()
                if rows:
                    s.execute(insert(EvaluationResult), [{"evaluation_id": ev.id, **r} for r in rows])
                return EvaluationInfo(
                    ev.id, t.label, ev.model, dataset, agg, len(rows), _ts(ev.created_at), (), ev.settings
                )

        return retry_locked(run)

    def list_evaluations(self, target: str | None = None, *, kind: str | None = None) -> list[EvaluationInfo]:
        with self.db.read() as s:
            q = select(Evaluation).order_by(Evaluation.id)
            if target is not None:
                t = refs.resolve_any(s, target, kind)
                col = {
                    "patch": Evaluation.patch_id,
                    "base": Evaluation.base_version_id,
                    "derived": Evaluation.derived_id,
                }[t.kind]
                q = q.where(col == t.id)
            return [self._eval_info(s, ev, results=False) for ev in s.execute(q).scalars()]

    def get_evaluation(self, evaluation_id: int) -> EvaluationInfo:
        with self.db.read() as s:
            ev = s.get(Evaluation, evaluation_id)
            if ev is None:
                raise UnknownReferenceError(f"no evaluation {evaluation_id} (list them with Registry.list_evaluations)")
            return self._eval_info(s, ev, results=True)

    def _eval_info(self, s: Session, ev: Evaluation, *, results: bool) -> EvaluationInfo:
        if ev.derived_id is not None:
            label = f"derived:{ev.derived_id}"
        else:
            label = self._target_label(s, ev.base_version_id, ev.patch_id)
        res: tuple[dict[str, Any], ...] = ()
        if results:
            res = tuple(
                {
                    "id": r.instance_id,
                    "prediction": r.prediction,
                    "gold": r.gold,
                    "correct": r.correct,
                    "score": r.score,
                    **(r.details or {}),
                }
                for r in s.execute(
                    select(EvaluationResult)
                    .where(EvaluationResult.evaluation_id == ev.id)
                    .order_by(EvaluationResult.position, EvaluationResult.instance_id)
                ).scalars()
            )
        return EvaluationInfo(
            ev.id, label, ev.model, ev.dataset, ev.metrics, ev.num_instances, _ts(ev.created_at), res, ev.settings
        )

    def record_eval_result(
        self, target: str, result: Any, *, model: str | None = None, kind: str | None = None
    ) -> list[EvaluationInfo]:
        """Store a ``patchlab.measure.results.EvalResult`` (or its saved JSON file, or its ``to_json()`` dict) as one
        evaluation per task of ``target``; :meth:`eval_result` gives it back."""
        from patchlab.measure.results import EvalResult

        if isinstance(result, (str, os.PathLike)):
            try:
                result = EvalResult.load(result)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise InvalidReferenceError(
                    f"{os.fspath(result)} is not a readable patchlab evaluation result ({exc}); save one with "
                    "EvalResult.save"
                ) from None
        elif isinstance(result, Mapping):
            result = EvalResult.from_json(dict(result))
        out = []
        for task, summary in result.tasks.items():
            records = [
                {
                    "id": inst.id,
                    "prediction": inst.prediction,
                    "gold": inst.gold,
                    "correct": inst.correct,
                    "score": inst.score,
                    "task": inst.task,
                    "type": inst.type,
                    "truncated": inst.truncated,
                    "prompt_hash": inst.prompt_hash,
                    "details": inst.details,
                }
                for inst in result.instances
                if inst.task == task
            ]
            out.append(
                self.record_evaluation(
                    target,
                    task,
                    records,
                    metrics=_shallow(summary),
                    model=model or result.model,
                    kind=kind,
                    settings=result.settings,
                )
            )
        return out

    def eval_result(self, target: str, *, kind: str | None = None, tasks: Iterable[str] | None = None) -> Any:
        """The newest stored evaluation of each task (dataset) of ``target``, as a
        ``patchlab.measure.results.EvalResult`` ready for ``patchlab.measure.flips.compare``."""
        wanted = set(tasks) if tasks is not None else None
        newest: dict[str, EvaluationInfo] = {}
        for e in self.list_evaluations(target, kind=kind):
            if wanted is None or e.dataset in wanted:
                newest[e.dataset] = e  # ids ascend: the last one wins
        if not newest:
            raise UnknownReferenceError(
                f"{target!r} has no stored evaluations"
                + (f" of {', '.join(sorted(wanted))}" if wanted else "")
                + "; record one with Registry.record_eval_result"
            )
        return self._eval_results([self.get_evaluation(e.id) for e in newest.values()], target)

    def evaluations_result(self, evaluation_ids: Iterable[int]) -> Any:
        """Stored evaluations picked by id (``patchlab evals ls``), merged into one
        ``patchlab.measure.results.EvalResult`` ready for ``patchlab.measure.flips.compare``."""
        ids = list(evaluation_ids)
        if not ids:
            raise InvalidReferenceError("no evaluation ids given; list them with `patchlab evals ls`")
        fulls = [self.get_evaluation(int(i)) for i in ids]
        seen: dict[str, int] = {}
        for e in fulls:
            if e.dataset in seen:
                raise InvalidReferenceError(
                    f"evaluations {seen[e.dataset]} and {e.id} are both of task {e.dataset!r}; pick one per task"
                )
            seen[e.dataset] = e.id
        return self._eval_results(fulls, fulls[0].target)

    @staticmethod
    def _eval_results(fulls: Sequence[EvaluationInfo], model: str) -> Any:
        """Per-task stored evaluations (with their results) as one ``EvalResult``."""
        from patchlab.measure.results import EvalResult, InstanceResult, TaskSummary

        instances: list[Any] = []
        summaries: dict[str, Any] = {}
        settings: dict[str, Any] = {}
        for full in fulls:
            task = full.dataset
            model, settings = full.model, full.settings or settings
            for r in full.results:
                instances.append(
                    InstanceResult(
                        task=r.get("task", task),
                        id=r["id"],
                        type=r.get("type", "unknown"),
                        prediction=r["prediction"],
                        gold=r["gold"],
                        correct=bool(r["correct"]),
                        score=r["score"] if r["score"] is not None else float("nan"),
                        truncated=r.get("truncated", 0),
                        prompt_hash=r.get("prompt_hash"),
                        details=r.get("details") or {},
                    )
                )
            m = full.metrics or {}
            known = {f for f in TaskSummary.__dataclass_fields__}
            if {"task", "n", "n_correct", "accuracy", "mean_score"} <= set(m):
                summaries[task] = TaskSummary(**{k: v for k, v in m.items() if k in known})
            else:
                from patchlab.measure.results import summarise

                summaries.update(summarise([i for i in instances if i.task == task]))
        return EvalResult(model=model, tasks=summaries, instances=instances, settings=dict(settings))


# ---- helpers -----------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, Any]:
    """The ``patch.json`` of a patch directory, checked for what the registry needs."""
    if not path.is_dir():
        raise ManifestError(f"patch directory {path} does not exist (or is not a directory)")
    mf = path / MANIFEST
    if not mf.is_file():
        raise ManifestError(
            f"{path} has no {MANIFEST}: it is not a patchlab patch directory (make one with `patchlab diff`)"
        )
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{mf} is not valid JSON ({exc}); the patch is damaged: re-extract it") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tensors"), dict):
        raise ManifestError(f"{mf} has no 'tensors' table; it is not a patchlab manifest or is damaged")
    for name, entry in manifest["tensors"].items():
        f = entry.get("file") if isinstance(entry, dict) else None
        if f is not None and not (path / f).is_file():
            raise ManifestError(
                f"{mf} says tensor {name!r} is in {f}, which is missing from {path}; the patch is incomplete"
            )
    from patchlab.io.patch import Patch as CorePatch  # lazy: torch is not needed to list a registry

    try:  # the core's own checks: format, version, encodings, every key present in its shard
        CorePatch.open(path)
    except PatchFormatError as exc:
        raise ManifestError(str(exc)) from None
    return manifest


def _patch_files(src: Path) -> list[str]:
    out = []
    for p in sorted(src.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts):
            out.append(p.relative_to(src).as_posix())
    return out


def _default_name(src: Path, ft_prov: Mapping[str, Any]) -> str:
    import re

    raw = src.resolve().name
    cleaned = re.sub(r"[^A-Za-z0-9._+\-]+", "-", raw).strip("-._+") or "patch"
    return cleaned[:200]


def _source_text(prov: Mapping[str, Any]) -> str | None:
    if not prov:
        return None
    for key in ("path", "repo_id", "source"):
        if prov.get(key):
            return str(prov[key])
    return json.dumps(prov, sort_keys=True)


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _group(pairs: Iterable[tuple[Any, Any]]) -> dict[Any, list[Any]]:
    out: dict[Any, list[Any]] = defaultdict(list)
    for k, v in pairs:
        out[k].append(v)
    return out


def _descendants(s: Session, roots: set[int]) -> set[int]:
    """Patches that came from any of ``roots`` (ports, merges), transitively, plus the roots."""
    out, frontier = set(roots), set(roots)
    while frontier:
        nxt = set(s.execute(select(PatchParent.child_id).where(PatchParent.parent_id.in_(frontier))).scalars())
        frontier = nxt - out
        out |= frontier
    return out


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    agg: dict[str, Any] = {"n": len(rows)}
    correct = [r["correct"] for r in rows if r["correct"] is not None]
    scores = [r["score"] for r in rows if r["score"] is not None]
    if correct:
        agg["accuracy"] = sum(correct) / len(correct)
    if scores:
        agg["mean_score"] = sum(scores) / len(scores)
    return agg


def _checkpoint_facts(path: Path) -> dict[str, Any]:
    """Fingerprint and facts of a local checkpoint, from ``patchlab.io.checkpoint`` when it is available."""
    try:
        from patchlab.io.checkpoint import Checkpoint
    except ImportError:  # the core is not installed: facts must be passed explicitly
        return {}
    ck = Checkpoint.open(path)
    fp = ck.fingerprint()
    return {
        "architecture": fp.architecture,
        "content": fp.content,
        "num_parameters": ck.num_parameters,
        "dtype": str(ck.dtype),
        "vocab_size": ck.vocab_size,
    }
