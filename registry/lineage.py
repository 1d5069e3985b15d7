"""Lineage: the tree of what a patch was ported or merged from, back to its origin."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry import refs
from registry.records import LineageNode
from registry.rows import BaseVersionRow, FamilyRow, PatchParentRow, PatchRow
from registry.topic import Topic


class Lineage(Topic):
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
                    select(
                        PatchRow.id,
                        PatchRow.name,
                        PatchRow.version,
                        PatchRow.digest,
                        FamilyRow.name,
                        BaseVersionRow.version,
                    )
                    .outerjoin(BaseVersionRow, BaseVersionRow.id == PatchRow.base_version_id)
                    .outerjoin(FamilyRow, FamilyRow.id == BaseVersionRow.family_id)
                    .where(PatchRow.id.in_(frontier))
                ).all():
                    info[pid] = (f"{n}@{v}", dg, f"{fam}@{bver}" if fam else None)
                nxt = set()
                for child, parent, rel in s.execute(
                    select(PatchParentRow.child_id, PatchParentRow.parent_id, PatchParentRow.relation)
                    .where(PatchParentRow.child_id.in_(frontier))
                    .order_by(PatchParentRow.child_id, PatchParentRow.position)
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


def descendants(s: Session, roots: set[int]) -> set[int]:
    """Patches that came from any of ``roots`` (ports, merges), transitively, plus the roots."""
    out, frontier = set(roots), set(roots)
    while frontier:
        nxt = set(s.execute(select(PatchParentRow.child_id).where(PatchParentRow.parent_id.in_(frontier))).scalars())
        frontier = nxt - out
        out |= frontier
    return out
