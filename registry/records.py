"""The typed records ``Registry`` returns: plain frozen values, detached from any database session."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any


def fields_dict(obj: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict, without ``asdict``'s deep copy (10x faster over 10,000 rows)."""
    return {k: (list(v) if type(v) is tuple else v) for k, v in vars(obj).items()}


def timestamp(dt: _dt.datetime | None) -> str:
    """A stored (naive UTC) time as ISO 8601 with a ``Z``; empty when unset."""
    return dt.isoformat(timespec="seconds") + "Z" if dt is not None else ""


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
        return {"ref": self.ref, **fields_dict(self)}


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
        d = {"ref": self.ref, **fields_dict(self)}
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
        return {"ref": self.ref, **fields_dict(self)}


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
        return {"ref": self.ref, **fields_dict(self)}


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
        d = fields_dict(self)
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
    changed_bases: tuple[tuple[str, str], ...] = ()  # (base, what changed) for local bases changed on disk
    checked_bases: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.changed_bases

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "problems": [fields_dict(p) for p in self.problems],
            "missing_bases": list(self.missing_bases),
            "changed_bases": [{"base": b, "problem": why} for b, why in self.changed_bases],
            "checked_bases": self.checked_bases,
        }


@dataclass(frozen=True)
class GcReport:
    removed: tuple[str, ...]
    freed_bytes: int
    kept: int
    skipped_young: int
    dry_run: bool
    leftovers: tuple[str, ...] = ()  # partial outputs and scratch copies killed commands left
    leftover_bytes: int = 0
    orphans: tuple[str, ...] = ()  # complete outputs never recorded: rerun their command to finish

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)


@dataclass(frozen=True)
class PushInfo:
    """One push to a Hub repo: ``source`` is the patch (name@version) or derived model (derived:N) pushed."""

    id: int
    endpoint: str
    repo_id: str
    revision: str  # the branch pushed to, or refs/pr/N
    branch: str
    commit_sha: str
    kind: str  # "patch" | "peft" | "model"
    source: str
    created_commit: bool
    created_at: str

    @property
    def ref(self) -> str:
        return f"{self.repo_id}@{self.commit_sha[:12]}"

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, **fields_dict(self)}
