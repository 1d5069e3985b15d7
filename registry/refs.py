"""References users type, and resolving them against the registry.

* bases: ``family@version`` (a version label), ``family@alias``, or ``family`` (newest release);
* patches: ``name`` (newest version), ``name@n``, ``name@alias``, a digest prefix of at least 6 hex
  digits (optionally ``sha256:``-prefixed), or an alias name that only one patch name uses;
* derived models: ``derived:<id>``;
* plain paths wherever a checkpoint or patch directory is accepted (see ``looks_like_path``).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from patchlab.digests import PREFIXES, hex_part
from registry.errors import AmbiguousReferenceError, InvalidReferenceError, UnknownReferenceError
from registry.rows import AliasRow, BaseVersionRow, DerivedModelRow, FamilyRow, PatchRow

MIN_PREFIX = 6
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]*$")
FAMILY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-/]*$")
HEX_RE = re.compile(r"^[0-9a-f]+$")
LATEST = "latest"


def validate_name(name: str, what: str = "patch name") -> str:
    pattern = FAMILY_RE if what == "family name" else NAME_RE
    if not name or not pattern.match(name) or len(name) > 200:
        extra = ", '/'" if what == "family name" else ""
        raise InvalidReferenceError(
            f"{name!r} is not a valid {what}: use letters, digits and '.', '_', '-', '+'{extra} "
            "(starting with a letter or digit, at most 200 characters)"
        )
    return name


def validate_version_label(label: str) -> str:
    if not label or "@" in label or len(label) > 200 or label.strip() != label:
        raise InvalidReferenceError(
            f"{label!r} is not a valid version label: use a non-empty label without '@' or surrounding spaces"
        )
    if label == LATEST:
        raise InvalidReferenceError("'latest' is reserved: it always means the newest release")
    return label


def looks_like_path(ref: str | os.PathLike[str]) -> bool:
    """True for things that are paths rather than registry references."""
    if isinstance(ref, os.PathLike):
        return True
    return ref.startswith((".", "/", "~")) or Path(ref).is_dir()


def split_ref(ref: str) -> tuple[str, str | None]:
    ref = ref.strip()
    if not ref:
        raise InvalidReferenceError("empty reference: name a base (family@version) or a patch (name[@n])")
    if "@" in ref:
        head, tail = ref.rsplit("@", 1)
        if not head or not tail:
            raise InvalidReferenceError(
                f"{ref!r} is not a valid reference: expected 'name@version' with both parts non-empty"
            )
        return head, tail
    return ref, None


def close_matches(word: str, candidates: list[str]) -> str:
    """ "; did you mean ...?" for the candidates close to ``word``, else nothing."""
    near = difflib.get_close_matches(word, candidates, n=5, cutoff=0.5)
    return f"; did you mean {', '.join(near)}?" if near else ""


@dataclass(frozen=True)
class Target:
    """What a reference resolved to."""

    kind: str  # "base" | "patch" | "derived"
    id: int
    label: str


def base_label(family: str, version: str) -> str:
    return f"{family}@{version}"


def resolve_base(s: Session, ref: str) -> Target:
    """Resolve a base reference to a base version (``family@version``/``family@alias``/``family``)."""
    head, tail = split_ref(ref)
    fam = s.execute(select(FamilyRow).where(FamilyRow.name == head)).scalar_one_or_none()
    if fam is None:
        names = list(s.execute(select(FamilyRow.name)).scalars())
        prefix_hits = _content_prefix(s, ref) if tail is None else []
        if len(prefix_hits) == 1:
            return prefix_hits[0]
        if len(prefix_hits) > 1:
            raise AmbiguousReferenceError(
                f"content prefix {ref!r} matches {len(prefix_hits)} bases: "
                + ", ".join(h.label for h in prefix_hits)
                + "; name one of them (family@version) or type more digits"
            )
        raise UnknownReferenceError(
            f"no base family {head!r} in the registry{close_matches(head, names)} "
            "(list them with `patchlab ls --bases`; add one with `patchlab base add`)"
        )
    q = select(BaseVersionRow).where(BaseVersionRow.family_id == fam.id)
    if tail is None or (tail == LATEST and not _alias(s, "family", head, tail)):
        bv = s.execute(q.order_by(BaseVersionRow.release_order.desc()).limit(1)).scalar_one_or_none()
        if bv is None:
            raise UnknownReferenceError(f"base family {head!r} has no versions; add one with `patchlab base add`")
        return Target("base", bv.id, base_label(head, bv.version))
    bv = s.execute(q.where(BaseVersionRow.version == tail)).scalar_one_or_none()
    alias = _alias(s, "family", head, tail)
    if bv is not None:
        if alias is not None and alias.base_version_id not in (None, bv.id):
            other = s.execute(
                select(BaseVersionRow.version).where(BaseVersionRow.id == alias.base_version_id)
            ).scalar_one()
            raise AmbiguousReferenceError(
                f"{ref!r} names both version {base_label(head, bv.version)} and alias {head}@{tail} -> "
                f"{base_label(head, other)}; rename the alias (`patchlab alias rm {head}@{tail}`)"
            )
        return Target("base", bv.id, base_label(head, bv.version))
    if alias is not None and alias.base_version_id is not None:
        version = s.execute(
            select(BaseVersionRow.version).where(BaseVersionRow.id == alias.base_version_id)
        ).scalar_one()
        return Target("base", alias.base_version_id, base_label(head, version))
    versions = list(s.execute(select(BaseVersionRow.version).where(BaseVersionRow.family_id == fam.id)).scalars())
    aliases = list(
        s.execute(select(AliasRow.name).where(AliasRow.scope_kind == "family", AliasRow.scope == head)).scalars()
    )
    raise UnknownReferenceError(
        f"base family {head!r} has no version or alias {tail!r}{close_matches(tail, versions + aliases)} "
        f"(versions: {', '.join(versions) or 'none'})"
    )


def _content_prefix(s: Session, ref: str) -> list[Target]:
    p = hex_part(ref.lower().removeprefix("sha256:"))
    if len(p) < MIN_PREFIX or not HEX_RE.match(p):
        return []
    like = [BaseVersionRow.content.like(prefix + p + "%") for prefix in dict.fromkeys(PREFIXES.values())]
    rows = s.execute(
        select(BaseVersionRow.id, FamilyRow.name, BaseVersionRow.version)
        .join(FamilyRow, FamilyRow.id == BaseVersionRow.family_id)
        .where(or_(*like))
        .limit(10)
    ).all()
    return [Target("base", r[0], base_label(r[1], r[2])) for r in rows]


def _alias(s: Session, scope_kind: str, scope: str, name: str) -> AliasRow | None:
    return s.execute(
        select(AliasRow).where(AliasRow.scope_kind == scope_kind, AliasRow.scope == scope, AliasRow.name == name)
    ).scalar_one_or_none()


def patch_label(name: str, version: int) -> str:
    return f"{name}@{version}"


def resolve_patch(s: Session, ref: str) -> Target:
    """Resolve a patch reference (name, name@n, name@alias, digest prefix, or a unique alias name)."""
    head, tail = split_ref(ref)
    if tail is None:
        hits: list[Target] = []
        latest = s.execute(
            select(PatchRow.id, PatchRow.version)
            .where(PatchRow.name == head)
            .order_by(PatchRow.version.desc())
            .limit(1)
        ).first()
        if latest is not None:
            alias = _alias(s, "patch", head, LATEST)
            if alias is not None:
                return _patch_target(s, alias.patch_id)
            hits.append(Target("patch", latest[0], patch_label(head, latest[1])))
        p = head.removeprefix("sha256:").lower()
        if len(p) >= MIN_PREFIX and HEX_RE.match(p):
            rows = s.execute(
                select(PatchRow.id, PatchRow.name, PatchRow.version, PatchRow.digest)
                .where(PatchRow.digest.like(p + "%"))
                .limit(20)
            ).all()
            digests = {r[3] for r in rows}
            if len(digests) > 1:
                raise AmbiguousReferenceError(
                    f"digest prefix {p!r} matches {len(digests)} patches: "
                    + ", ".join(f"{r[1]}@{r[2]} ({r[3][:12]})" for r in rows[:10])
                    + "; type more digits"
                )
            if len(rows) > 1:
                # identical content registered under several names: refuse rather than pick one
                raise AmbiguousReferenceError(
                    f"digest prefix {p!r} matches {len(rows)} registered patches with the same content: "
                    + ", ".join(f"{r[1]}@{r[2]}" for r in sorted(rows, key=lambda r: (r[1], r[2]))[:10])
                    + "; name the one you mean (name@version)"
                )
            if rows:
                r = rows[0]
                if not hits or hits[0].id != r[0]:
                    hits.append(Target("patch", r[0], patch_label(r[1], r[2])))
        alias_rows = s.execute(
            select(AliasRow.scope, AliasRow.patch_id).where(AliasRow.scope_kind == "patch", AliasRow.name == head)
        ).all()
        clash = [r for r in alias_rows if hits and r[1] != hits[0].id]
        if clash:
            raise AmbiguousReferenceError(
                f"{ref!r} is both {hits[0].label} and an alias ("
                + ", ".join(f"{r[0]}@{head}" for r in clash)
                + f"); say which: {hits[0].label} or {clash[0][0]}@{head}"
            )
        if not hits:
            if len(alias_rows) == 1:
                return _patch_target(s, alias_rows[0][1])
            if len(alias_rows) > 1:
                raise AmbiguousReferenceError(
                    f"alias {head!r} is set on several patch names ("
                    + ", ".join(f"{r[0]}@{head}" for r in alias_rows)
                    + "); say which one, e.g. "
                    + f"{alias_rows[0][0]}@{head}"
                )
        if len(hits) > 1:
            raise AmbiguousReferenceError(
                f"{ref!r} is both a patch name and a digest prefix ({', '.join(h.label for h in hits)}); "
                f"use {hits[0].label} or a longer digest"
            )
        if hits:
            return hits[0]
        names = list(s.execute(select(PatchRow.name).distinct()).scalars())
        raise UnknownReferenceError(
            f"no patch {head!r} in the registry{close_matches(head, names)} (list them with `patchlab ls`)"
        )
    alias = _alias(s, "patch", head, tail)
    if tail.isdigit():
        row = s.execute(select(PatchRow.id).where(PatchRow.name == head, PatchRow.version == int(tail))).first()
        if row is not None:
            if alias is not None and alias.patch_id != row[0]:
                other = _patch_target(s, alias.patch_id).label
                raise AmbiguousReferenceError(
                    f"{ref!r} names both version {patch_label(head, int(tail))} and alias {head}@{tail} -> "
                    f"{other}; rename the alias (`patchlab alias rm {head}@{tail}`)"
                )
            return Target("patch", row[0], patch_label(head, int(tail)))
    if alias is not None:
        return _patch_target(s, alias.patch_id)
    versions = [
        str(v)
        for v in s.execute(select(PatchRow.version).where(PatchRow.name == head).order_by(PatchRow.version)).scalars()
    ]
    if not versions:
        names = list(s.execute(select(PatchRow.name).distinct()).scalars())
        raise UnknownReferenceError(
            f"no patch {head!r} in the registry{close_matches(head, names)} (list them with `patchlab ls`)"
        )
    if tail == LATEST:
        return resolve_patch(s, head)
    raise UnknownReferenceError(
        f"patch {head!r} has no version or alias {tail!r} (versions: {', '.join(versions)}); "
        f"use e.g. {head}@{versions[-1]}"
    )


def _patch_target(s: Session, patch_id: int | None) -> Target:
    row = s.execute(select(PatchRow.name, PatchRow.version).where(PatchRow.id == patch_id)).one()
    return Target("patch", int(patch_id or 0), patch_label(row[0], row[1]))


def resolve_derived(s: Session, ref: str) -> Target:
    raw = ref.removeprefix("derived:")
    if not raw.isdigit():
        raise InvalidReferenceError(f"{ref!r} is not a derived-model reference: expected derived:<id>")
    row = s.execute(select(DerivedModelRow.id, DerivedModelRow.path).where(DerivedModelRow.id == int(raw))).first()
    if row is None:
        n = s.execute(select(func.count(DerivedModelRow.id))).scalar_one()
        raise UnknownReferenceError(
            f"no derived model {ref!r} ({n} registered; list them with `patchlab ls --derived`)"
        )
    return Target("derived", row[0], f"derived:{row[0]}")


def resolve_any(s: Session, ref: str, kind: str | None = None) -> Target:
    """Resolve a reference to a base, patch or derived model; ``kind`` restricts the search."""
    if kind == "base":
        return resolve_base(s, ref)
    if kind == "patch":
        return resolve_patch(s, ref)
    if kind == "derived" or ref.startswith("derived:"):
        return resolve_derived(s, ref)
    found: list[Target] = []
    errors: list[Exception] = []
    for fn in (resolve_patch, resolve_base):
        try:
            found.append(fn(s, ref))
        except UnknownReferenceError as exc:
            errors.append(exc)
    if len(found) > 1:
        raise AmbiguousReferenceError(
            f"{ref!r} names both patch {found[0].label} and base {found[1].label}; say which (--kind patch|base)"
        )
    if found:
        return found[0]
    head, _ = split_ref(ref)
    names = list(s.execute(select(PatchRow.name).distinct()).scalars()) + list(
        s.execute(select(FamilyRow.name)).scalars()
    )
    raise UnknownReferenceError(
        f"{ref!r} names no patch or base in the registry{close_matches(head, names)} "
        "(list them with `patchlab ls` and `patchlab ls --bases`)"
    )
