"""Patches: a patch directory stored as blobs and registered as ``name@version``; listed, shown and
materialised back as a verified directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from patchlab.digests import ALGORITHMS, CONTENT_ALGORITHM, content_algorithm, same_algorithm, short_digest
from patchlab.errors import PatchFormatError, UnknownDigestError
from registry import refs
from registry.blobs import sha256_file, tree_digest, tree_listing
from registry.db import retry_locked
from registry.errors import InvalidReferenceError, ManifestError, UnknownReferenceError
from registry.records import PatchInfo, timestamp
from registry.rows import (
    AliasRow,
    BaseVersionRow,
    FamilyRow,
    PatchFileRow,
    PatchParentRow,
    PatchRow,
    TagRow,
)
from registry.topic import Topic, group, json_safe

MANIFEST = "patch.json"
PARENT_RELATIONS = ("port", "merge", "derived")


class Patches(Topic):
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
        if name is None:
            name = default_name(src)
        self._check_registration(name, relation, tags)
        # 1. blobs first: a row must never point at a blob that is not there
        files = {rel: self.blobs.put_file(src / rel) for rel in patch_files(src)}
        return self._register(manifest, files, str(src), name, base, parents, relation, description, tags, require_base)

    def add_ported_patch(
        self,
        source: str,
        *,
        base: str,
        name: str | None = None,
        description: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        drift_sums: Mapping[str, Mapping[str, float]] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> PatchInfo:
        """Register ``source``'s Δ, unchanged, as the next version of its name on ``base`` (relation ``port``).

        This is what fine-tuning transfer stores for a patch ported with α = 1 and no vocabulary change:
        ``apply(new, base)`` runs the same plan and kernels as ``port(source, base)`` (residuals included), so it
        reproduces that port bit for bit, and no tensor byte is read, hashed or written: the new version shares
        the source's blobs; only its manifest (provenance: the new base, the patch it was ported from) is new.

        ``drift_sums``: per tensor, the Δ's sums against ``base`` (``Diagnosis.target_sums`` of the port); the
        source's own sums belong to its old base and are dropped. ``base_dir``: ``base``'s checkpoint directory
        when the caller located it already (``checkpoint_path``; an upgrade run does so once for all its patches).
        """
        from patchlab.io.checkpoint import Checkpoint  # lazy: torch

        with self.db.read() as s:  # the source's identity and files, the base's row: no PatchInfo needed
            src = refs.resolve_patch(s, source)
            src_name, src_digest = s.execute(select(PatchRow.name, PatchRow.digest).where(PatchRow.id == src.id)).one()
            files = {
                n: (dg, sz)
                for n, dg, sz in s.execute(
                    select(PatchFileRow.name, PatchFileRow.digest, PatchFileRow.size).where(
                        PatchFileRow.patch_id == src.id
                    )
                )
            }
            target = refs.resolve_base(s, base)
            row = s.get(BaseVersionRow, target.id)
            content, arch = (row.content, row.architecture) if row is not None else (None, None)
        name = name or src_name
        self._check_registration(name, "port", [])
        if MANIFEST not in files:
            raise ManifestError(f"patch {src.label} has no {MANIFEST} among its files; run `patchlab verify`")
        manifest = json.loads(self.blobs.read_bytes(files[MANIFEST][0]))
        base_desc = Checkpoint.open(base_dir or self.checkpoint_path(target.label)).describe()
        base_desc.update({k: v for k, v in (("content", content), ("architecture", arch)) if v})
        for tname, entry in (manifest.get("tensors") or {}).items():
            entry.pop("drift_sums", None)  # sums against the old base
            if drift_sums and tname in drift_sums:
                entry["drift_sums"] = dict(drift_sums[tname])
        prov = dict(manifest.get("provenance") or {})
        old_params = prov.get("parameters") if isinstance(prov.get("parameters"), dict) else {}
        manifest["provenance"] = {
            "base": base_desc,
            "finetuned": prov.get("finetuned"),
            "method": "port",
            "parameters": {
                "ported_from": {"patch": src.label, "digest": src_digest, "base": prov.get("base")},
                "alpha": 1.0,
                "exact": bool(old_params.get("exact")),
                "storage_dtype": old_params.get("storage_dtype"),
                # what made the Δ first (an edit's edit set, say), carried from release to release
                "source_method": old_params.get("source_method", prov.get("method")),
                "source_parameters": old_params.get("source_parameters", old_params),
                **dict(parameters or {}),
            },
        }
        data = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
        files[MANIFEST] = (self.blobs.put_bytes(data), len(data))
        return self._register(
            manifest, files, f"{src.label} (ported)", name, base, [src.label], "port", description, [], True
        )

    def _check_registration(self, name: str, relation: str, tags: Iterable[str]) -> None:
        refs.validate_name(name)
        if relation not in PARENT_RELATIONS:
            raise InvalidReferenceError(f"relation must be one of {', '.join(PARENT_RELATIONS)}, not {relation!r}")
        for t in tags:
            refs.validate_name(t, "tag")

    def _register(
        self,
        manifest: dict[str, Any],
        files: dict[str, tuple[str, int]],
        where: str,
        name: str,
        base: str | None,
        parents: Iterable[str],
        relation: str,
        description: str | None,
        tags: Iterable[str],
        require_base: bool,
    ) -> PatchInfo:
        """The registry rows of a patch whose files (``rel -> (blob digest, size)``) are already blobs."""
        prov = manifest.get("provenance") or {}
        base_prov = prov.get("base") or {}
        ft_prov = prov.get("finetuned") or {}
        parents = list(parents)
        tags = list(tags)
        tensors = manifest.get("tensors") or {}
        encodings = sorted({str(t.get("encoding", "dense")) for t in tensors.values() if isinstance(t, dict)})
        encoding = encodings[0] if len(encodings) == 1 else ("mixed" if encodings else None)
        stats = {
            k: {key: t.get(key) for key in ("op", "encoding", "shape", "dtype", "stats") if key in t}
            for k, t in tensors.items()
            if isinstance(t, dict)
        }
        listing = {k: v[0] for k, v in files.items()}
        digest = tree_digest(listing)
        self.blobs.put_bytes(tree_listing(listing))
        size = sum(v[1] for v in files.values())
        src = Path(where)

        # 2. then the row, in one short write transaction
        def run() -> PatchInfo:
            with self.db.write() as s:
                same = s.execute(select(PatchRow.id).where(PatchRow.name == name, PatchRow.digest == digest)).first()
                if same is not None:  # re-registering: no new version; given parents and tags are added
                    link(s, same[0], [refs.resolve_patch(s, p).id for p in parents], relation, tags)
                    return patch_infos(s, [same[0]])[0]
                base_id = match_base(s, base, base_prov, src, require_base)
                parent_ids = [refs.resolve_patch(s, p).id for p in parents]
                top = s.execute(select(func.max(PatchRow.version)).where(PatchRow.name == name)).scalar_one()
                row = PatchRow(
                    name=name,
                    version=(top or 0) + 1,
                    digest=digest,
                    size=size,
                    base_version_id=base_id,
                    base_architecture=base_prov.get("architecture"),
                    base_content=base_prov.get("content"),
                    finetuned=source_text(ft_prov),
                    encoding=encoding,
                    method=prov.get("method"),
                    parameters=json_safe(prov.get("parameters"), "parameters"),
                    num_tensors=len(tensors),
                    format_version=opt_str(manifest.get("format_version")),
                    description=description,
                    totals=manifest.get("totals"),
                    stats=stats,
                )
                s.add(row)
                s.flush()
                s.execute(
                    insert(PatchFileRow),
                    [{"patch_id": row.id, "name": n, "digest": d, "size": sz} for n, (d, sz) in files.items()],
                )
                link(s, row.id, parent_ids, relation, tags)
                return patch_infos(s, [row.id])[0]

        def run_retrying_version() -> PatchInfo:
            for _ in range(5):  # a concurrent writer on a server database may take the same version number
                try:
                    return run()
                except IntegrityError as exc:
                    if "uq_patches_name_version" not in str(exc) and "patches.name" not in str(exc):
                        raise
            return run()

        return retry_locked(run_retrying_version)

    def find_patch_dir(self, path: str | os.PathLike[str]) -> PatchInfo | None:
        """The newest registered patch whose files are exactly those of the directory ``path``, if any
        (how a command given a patch by path records it as a parent)."""
        src = Path(path).expanduser()
        if not (src / MANIFEST).is_file():
            return None
        digest = tree_digest({rel: sha256_file(src / rel) for rel in patch_files(src)})
        with self.db.read() as s:
            ids = list(s.execute(select(PatchRow.id).where(PatchRow.digest == digest).order_by(PatchRow.id)).scalars())
            return patch_infos(s, ids[-1:])[0] if ids else None

    def check_patch_registration(
        self,
        out: str | os.PathLike[str],
        *,
        name: str | None = None,
        base: str | None = None,
        base_path: str | os.PathLike[str] | None = None,
        parents: Iterable[str] = (),
        relation: str = "port",
    ) -> None:
        """Everything :meth:`add_patch` would refuse about a patch still to be written at ``out`` from
        ``base`` (a reference, else the checkpoint at ``base_path``): name, relation, parents, base. Lets a
        command fail before it writes anything."""
        refs.validate_name(name if name is not None else default_name(Path(out).expanduser()))
        if relation not in PARENT_RELATIONS:
            raise InvalidReferenceError(f"--relation must be one of {', '.join(PARENT_RELATIONS)}, not {relation!r}")
        with self.db.read() as s:
            for p in parents:
                refs.resolve_patch(s, p)
            if base is not None:
                refs.resolve_base(s, base)
                return
            if base_path is None:
                return
            src = str(Path(base_path).expanduser().resolve())
            hit = s.execute(
                select(BaseVersionRow.id).where(BaseVersionRow.source_kind == "local", BaseVersionRow.source == src)
            ).first()
        if hit is not None:
            return
        from patchlab.io.checkpoint import Checkpoint  # lazy: torch

        with self.db.read() as s:
            recorded = s.execute(select(BaseVersionRow.content).where(BaseVersionRow.content.is_not(None))).scalars()
            used = {_algorithm_or_none(c) for c in recorded} & set(ALGORITHMS)
        ck, hit = Checkpoint.open(base_path), None
        for algorithm in sorted(used, key=lambda a: a != CONTENT_ALGORITHM):  # each algorithm fingerprints use
            content = ck.scan(algorithm, check_finite=False).digest
            with self.db.read() as s:
                hit = s.execute(select(BaseVersionRow.id).where(BaseVersionRow.content == content)).first()
            if hit is not None:
                break
        if hit is None:
            raise UnknownReferenceError(
                f"the base {base_path} is not in the registry, so the patch could not be registered; register "
                "it first with `patchlab base add FAMILY@VERSION PATH`, or pass --no-register"
            )

    def get_patch(self, ref: str, *, detail: bool = False) -> PatchInfo:
        with self.db.read() as s:
            return patch_infos(s, [refs.resolve_patch(s, ref).id], detail=detail)[0]

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
            q = select(PatchRow.id)
            if name is not None:
                q = q.where(PatchRow.name == name)
            if base is not None:
                q = q.where(PatchRow.base_version_id == refs.resolve_base(s, base).id)
            if family is not None:
                q = (
                    q.join(BaseVersionRow, BaseVersionRow.id == PatchRow.base_version_id)
                    .join(FamilyRow, FamilyRow.id == BaseVersionRow.family_id)
                    .where(FamilyRow.name == family)
                )
            if tag is not None:
                q = q.where(PatchRow.id.in_(select(TagRow.patch_id).where(TagRow.tag == tag)))
            if not all_versions:
                latest = select(PatchRow.name, func.max(PatchRow.version).label("v")).group_by(PatchRow.name).subquery()
                q = q.join(latest, (latest.c.name == PatchRow.name) & (latest.c.v == PatchRow.version))
            if limit is not None:
                q = q.order_by(PatchRow.name, PatchRow.version).limit(limit)
            return patch_infos_q(s, q)

    def patch_path(self, ref: str, *, verify: bool = True) -> Path:
        """Materialise a registered patch as a directory under the cache (hardlinks to verified blobs)."""
        info = self.get_patch(ref, detail=True)
        return self._materialise(info, verify=verify)

    def resolve_patch_path(self, ref_or_path: str | os.PathLike[str], *, verify: bool = True) -> Path:
        """A patch directory: a plain path as given, else the registered patch, materialised."""
        if refs.looks_like_path(ref_or_path):
            return Path(ref_or_path).expanduser()
        return self.patch_path(os.fspath(ref_or_path), verify=verify)

    def _cached_file_ok(self, path: Path, digest: str) -> bool:
        """A file of a materialised patch holds its blob's bytes: a hard link to a verified blob, else re-hashed."""
        if self.blobs.same_file(path, digest):
            return self.blobs.verified(digest) == "ok"
        return sha256_file(path) == digest

    def _materialise(self, info: PatchInfo, *, verify: bool) -> Path:
        final = self.cache / "patches" / info.digest
        listing = {n: dg for n, dg, _ in info.files}
        if tree_digest(listing) != info.digest:
            raise InvalidReferenceError(f"patch {info.ref}: its file list does not match its digest; run verify")
        if final.is_dir():
            present = {p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()}
            good = present == set(listing) and (
                not verify or all(self._cached_file_ok(final / n, dg) for n, dg in listing.items())
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


# ---- over a session ---------------------------------------------------------------------------------


def link(s: Session, patch_id: int, parent_ids: list[int], relation: str, tags: list[str]) -> None:
    """Add lineage edges and tags a patch does not have yet."""
    have = set(s.execute(select(PatchParentRow.parent_id).where(PatchParentRow.child_id == patch_id)).scalars())
    start = len(have)
    new = [pid for pid in dict.fromkeys(parent_ids) if pid not in have]
    if patch_id in new:
        raise InvalidReferenceError("a patch cannot be its own parent")
    if new:
        s.execute(
            insert(PatchParentRow),
            [
                {"child_id": patch_id, "parent_id": pid, "relation": relation, "position": start + i}
                for i, pid in enumerate(new)
            ],
        )
    have_tags = set(s.execute(select(TagRow.tag).where(TagRow.patch_id == patch_id)).scalars())
    new_tags = [t for t in dict.fromkeys(tags) if t not in have_tags]
    if new_tags:
        s.execute(insert(TagRow), [{"tag": t, "patch_id": patch_id} for t in new_tags])


def match_base(s: Session, base: str | None, base_prov: Mapping[str, Any], src: Path, require: bool) -> int | None:
    """The base version a patch was made on: ``base`` if given (checked against the manifest's
    fingerprints), else the registered base with the manifest's content fingerprint, else the
    registered local base at the manifest's base path with the same architecture."""
    want_content, want_arch = base_prov.get("content"), base_prov.get("architecture")
    if base is not None:
        target = refs.resolve_base(s, base)
        bv = s.get(BaseVersionRow, target.id)
        for what, want, have in (
            ("content", want_content, bv.content if bv else None),
            ("architecture", want_arch, bv.architecture if bv else None),
        ):
            comparable = what != "content" or same_algorithm(want or "", have or "")  # two algorithms: cannot tell
            if want and have and comparable and want != have:
                raise InvalidReferenceError(
                    f"patch {src} was made on a base with {what} fingerprint {short_digest(want)}, but "
                    f"{target.label} has {short_digest(have)}; pass the base it was made on "
                    "(or omit --base to match by fingerprint)"
                )
        return target.id
    if want_content:
        bid = s.execute(
            select(BaseVersionRow.id).where(BaseVersionRow.content == want_content).order_by(BaseVersionRow.id).limit(1)
        ).scalar_one_or_none()
        if bid is not None:
            return bid
    base_path = base_prov.get("path")
    if base_path:
        q = select(BaseVersionRow.id, BaseVersionRow.architecture).where(
            BaseVersionRow.source_kind == "local", BaseVersionRow.source == str(Path(base_path).resolve())
        )
        for bid, arch in s.execute(q.order_by(BaseVersionRow.id)).all():
            if not (want_arch and arch and arch != want_arch):
                return bid
    if not require:
        return None
    hint = ", ".join(
        f"{k} {short_digest(v) if k != 'path' else v}"
        for k, v in (("content", want_content), ("architecture", want_arch), ("path", base_path))
        if v
    )
    raise UnknownReferenceError(
        f"patch {src} was made on a base that is not in the registry ({hint or 'no provenance'}); register "
        "it first with `patchlab base add FAMILY VERSION PATH`, or pass --base family@version"
    )


def patch_infos(s: Session, ids: Sequence[int], *, detail: bool = False) -> list[PatchInfo]:
    if not ids:
        return []
    return patch_infos_q(s, select(PatchRow.id).where(PatchRow.id.in_(list(ids))), detail=detail)


def patch_infos_q(s: Session, id_select, *, detail: bool = False) -> list[PatchInfo]:
    """PatchInfos of the patches ``id_select`` (a select of ``Patch.id``) picks, ordered by name and
    version: one query for the rows and one each for tags, aliases, parents (and files), whatever
    the count: the selection is a subquery, so no per-row queries and no huge parameter lists."""
    conn = s.connection()  # Core execution: these are plain column rows, no ORM loading needed
    sub = id_select.subquery()
    ids_in = select(sub.c.id)
    cols = [
        PatchRow.id,
        PatchRow.name,
        PatchRow.version,
        PatchRow.digest,
        PatchRow.size,
        PatchRow.base_version_id,
        PatchRow.base_architecture,
        PatchRow.base_content,
        PatchRow.finetuned,
        PatchRow.encoding,
        PatchRow.method,
        PatchRow.parameters,
        PatchRow.num_tensors,
        PatchRow.format_version,
        PatchRow.description,
        PatchRow.created_at,
        FamilyRow.name.label("family"),
        BaseVersionRow.version.label("base_version"),
    ]
    if detail:
        cols += [PatchRow.stats, PatchRow.totals]
    rows = conn.execute(
        select(*cols)
        .join(sub, sub.c.id == PatchRow.id)
        .outerjoin(BaseVersionRow, BaseVersionRow.id == PatchRow.base_version_id)
        .outerjoin(FamilyRow, FamilyRow.id == BaseVersionRow.family_id)
        .order_by(PatchRow.name, PatchRow.version)
    ).all()
    tags = group(conn.execute(select(TagRow.patch_id, TagRow.tag).where(TagRow.patch_id.in_(ids_in))).all())
    aliases = group(conn.execute(select(AliasRow.patch_id, AliasRow.name).where(AliasRow.patch_id.in_(ids_in))).all())
    parents: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for child, pname, pver, rel in conn.execute(
        select(PatchParentRow.child_id, PatchRow.name, PatchRow.version, PatchParentRow.relation)
        .join(PatchRow, PatchRow.id == PatchParentRow.parent_id)
        .where(PatchParentRow.child_id.in_(ids_in))
        .order_by(PatchParentRow.child_id, PatchParentRow.position)
    ).all():
        parents[child].append((f"{pname}@{pver}", rel))
    files: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
    if detail:
        for pid, n, dg, sz in conn.execute(
            select(PatchFileRow.patch_id, PatchFileRow.name, PatchFileRow.digest, PatchFileRow.size)
            .where(PatchFileRow.patch_id.in_(ids_in))
            .order_by(PatchFileRow.name)
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
                created_at=timestamp(r.created_at),
                tags=tuple(sorted(tags.get(r.id, ()))),
                aliases=tuple(sorted(aliases.get(r.id, ()))),
                parents=tuple(parents.get(r.id, ())),
                stats=r.stats if detail else None,
                totals=r.totals if detail else None,
                files=tuple(files.get(r.id, ())),
            )
        )
    return out


# ---- patch directories ---------------------------------------------------------------------------


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


def patch_files(src: Path) -> list[str]:
    out = []
    for p in sorted(src.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts):
            out.append(p.relative_to(src).as_posix())
    return out


def default_name(src: Path) -> str:
    """A patch name made from its directory's name."""
    raw = src.resolve().name
    cleaned = re.sub(r"[^A-Za-z0-9._+\-]+", "-", raw).strip("-._+") or "patch"
    return cleaned[:200]


def source_text(prov: Mapping[str, Any]) -> str | None:
    """The fine-tune a patch was made from, as stored: its path or repo id, else its provenance as JSON."""
    if not prov:
        return None
    for key in ("path", "repo_id", "source"):
        if prov.get(key):
            return str(prov[key])
    return json.dumps(prov, sort_keys=True)


def opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _algorithm_or_none(digest: str) -> str | None:
    try:
        return content_algorithm(digest)
    except UnknownDigestError:
        return None
