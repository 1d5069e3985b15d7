"""Labels: aliases (movable names such as ``prod``, scoped to a family or a patch name) and tags
(free-form labels on patches and base versions)."""

from __future__ import annotations

from sqlalchemy import delete, select, update

from registry import refs
from registry.db import retry_locked
from registry.errors import AlreadyExistsError, AmbiguousReferenceError, InvalidReferenceError, UnknownReferenceError
from registry.records import AliasInfo
from registry.rows import AliasRow, BaseVersionRow, FamilyRow, TagRow, utcnow
from registry.topic import Topic, target_label


class Labels(Topic):
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
                        select(BaseVersionRow.id)
                        .join(FamilyRow, FamilyRow.id == BaseVersionRow.family_id)
                        .where(FamilyRow.name == scope, BaseVersionRow.version == alias)
                    ).first()
                    if taken is not None:
                        raise AlreadyExistsError(
                            f"{scope}@{alias} is already a version label; choose another alias name"
                        )
                row = s.execute(
                    select(AliasRow).where(
                        AliasRow.scope_kind == scope_kind, AliasRow.scope == scope, AliasRow.name == alias
                    )
                ).scalar_one_or_none()
                target_cols = {
                    "base_version_id": t.id if t.kind == "base" else None,
                    "patch_id": t.id if t.kind == "patch" else None,
                }
                if row is None:
                    s.add(AliasRow(name=alias, scope_kind=scope_kind, scope=scope, **target_cols))
                else:
                    s.execute(update(AliasRow).where(AliasRow.id == row.id).values(updated_at=utcnow(), **target_cols))
                return AliasInfo(alias, scope_kind, scope, t.label)

        return retry_locked(run)

    def remove_alias(self, ref: str) -> AliasInfo:
        """Remove ``scope@alias`` (or a bare alias name used by exactly one scope)."""

        def run() -> AliasInfo:
            with self.db.write() as s:
                head, tail = refs.split_ref(ref)
                q = select(AliasRow)
                q = q.where(AliasRow.scope == head, AliasRow.name == tail) if tail else q.where(AliasRow.name == head)
                rows = list(s.execute(q).scalars())
                if not rows:
                    known = [f"{a.scope}@{a.name}" for a in s.execute(select(AliasRow)).scalars()]
                    raise UnknownReferenceError(
                        f"no alias {ref!r}{refs.close_matches(ref, known)} (aliases: {', '.join(known) or 'none'})"
                    )
                if len(rows) > 1:
                    raise AmbiguousReferenceError(
                        f"alias {ref!r} is set on " + ", ".join(f"{a.scope}@{a.name}" for a in rows) + "; say which"
                    )
                a = rows[0]
                label = target_label(s, a.base_version_id, a.patch_id)
                s.execute(delete(AliasRow).where(AliasRow.id == a.id))
                return AliasInfo(a.name, a.scope_kind, a.scope, label)

        return retry_locked(run)

    def list_aliases(self) -> list[AliasInfo]:
        with self.db.read() as s:
            rows = (
                s.execute(select(AliasRow).order_by(AliasRow.scope_kind, AliasRow.scope, AliasRow.name)).scalars().all()
            )
            return [
                AliasInfo(a.name, a.scope_kind, a.scope, target_label(s, a.base_version_id, a.patch_id)) for a in rows
            ]

    def add_tag(self, ref: str, tag: str, *, kind: str | None = None) -> str:
        """Tag a patch or base version; returns the resolved label. Tagging twice is a no-op."""
        refs.validate_name(tag, "tag")

        def run() -> str:
            with self.db.write() as s:
                t = refs.resolve_any(s, ref, kind)
                col = tag_column(t)
                if s.execute(select(TagRow.id).where(TagRow.tag == tag, col == t.id)).first() is None:
                    s.add(TagRow(tag=tag, **{col.key: t.id}))
                return t.label

        return retry_locked(run)

    def remove_tag(self, ref: str, tag: str, *, kind: str | None = None) -> str:
        def run() -> str:
            with self.db.write() as s:
                t = refs.resolve_any(s, ref, kind)
                col = tag_column(t)
                n = s.execute(delete(TagRow).where(TagRow.tag == tag, col == t.id)).rowcount
                if not n:
                    have = list(s.execute(select(TagRow.tag).where(col == t.id)).scalars())
                    raise UnknownReferenceError(
                        f"{t.label} has no tag {tag!r} (its tags: {', '.join(sorted(have)) or 'none'})"
                    )
                return t.label

        return retry_locked(run)


def tag_column(t: refs.Target):
    """The tag column that points at what ``t`` resolved to."""
    if t.kind == "patch":
        return TagRow.patch_id
    if t.kind == "base":
        return TagRow.base_version_id
    raise InvalidReferenceError("tags go on patches and base versions, not derived models")
