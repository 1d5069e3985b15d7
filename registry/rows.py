"""The registry's database rows: SQLAlchemy 2 ORM classes, one per table, named ``...Row`` (the schema at
the newest migration). They stay inside ``registry``: callers get the plain records of ``registry.records``.

The migrations under ``registry/migrations/versions`` are the source of truth for how a database gets
to this shape; ``tests/registry/test_migrations.py`` checks the two agree.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, deferred, mapped_column


def utcnow() -> _dt.datetime:
    """Naive UTC timestamp (SQLite keeps no time zone; every stored time is UTC)."""
    return _dt.datetime.now(_dt.UTC).replace(tzinfo=None)


class RowBase(DeclarativeBase):
    pass


class FamilyRow(RowBase):
    __tablename__ = "families"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)


class BaseVersionRow(RowBase):
    """One release of a base model: located (path or Hub id@revision) and fingerprinted, never copied."""

    __tablename__ = "base_versions"
    __table_args__ = (
        UniqueConstraint("family_id", "version", name="uq_base_versions_family_version"),
        Index("ix_base_versions_content", "content"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    family_id: Mapped[int] = mapped_column(ForeignKey("families.id"), nullable=False, index=True)
    version: Mapped[str] = mapped_column(String(200), nullable=False)
    source_kind: Mapped[str] = mapped_column(String(16), nullable=False)  # "local" | "hub"
    source: Mapped[str] = mapped_column(Text, nullable=False)  # absolute path or Hub repo id
    revision: Mapped[str | None] = mapped_column(String(200))
    architecture: Mapped[str | None] = mapped_column(String(128))
    content: Mapped[str | None] = mapped_column(String(128))
    num_parameters: Mapped[int | None] = mapped_column(BigInteger)
    dtype: Mapped[str | None] = mapped_column(String(32))
    vocab_size: Mapped[int | None] = mapped_column(Integer)
    release_order: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    # weight file -> [size, mtime_ns] at registration (local bases): checked before every use
    file_stats: Mapped[dict | None] = mapped_column(JSON)


class BaseDriftRow(RowBase):
    """How far one release moved from an older one, per tensor (the sums of ``measure.diagnose.BaseDrift``):
    measured once, when the newer release is registered, for every upgrade and diagnosis between the two.
    Valid while both releases keep the content fingerprints recorded here."""

    __tablename__ = "base_drifts"
    __table_args__ = (UniqueConstraint("source_id", "target_id", name="uq_base_drifts_pair"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("base_versions.id", ondelete="CASCADE"), nullable=False)
    target_id: Mapped[int] = mapped_column(
        ForeignKey("base_versions.id", ondelete="CASCADE"), nullable=False, index=True
    )
    source_content: Mapped[str] = mapped_column(String(128), nullable=False)
    target_content: Mapped[str] = mapped_column(String(128), nullable=False)
    # {"tensors": {name: DriftAccumulator fields}, "target_sumsq": {name: float}}
    sums: Mapped[dict] = deferred(mapped_column(JSON, nullable=False))
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)


class PatchRow(RowBase):
    """A registered patch: ``name@version``; its files live in the blob store under ``digest`` (a tree)."""

    __tablename__ = "patches"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_patches_name_version"),
        Index("ix_patches_digest", "digest"),
        Index("ix_patches_base_version_id", "base_version_id"),
        Index("ix_patches_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    digest: Mapped[str] = mapped_column(String(64), nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    base_version_id: Mapped[int | None] = mapped_column(ForeignKey("base_versions.id"))
    base_architecture: Mapped[str | None] = mapped_column(String(128))
    base_content: Mapped[str | None] = mapped_column(String(128))
    finetuned: Mapped[str | None] = mapped_column(Text)
    encoding: Mapped[str | None] = mapped_column(String(32))
    method: Mapped[str | None] = mapped_column(String(64))
    parameters: Mapped[Any] = mapped_column(JSON, nullable=True)
    num_tensors: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    format_version: Mapped[str | None] = mapped_column(String(32))
    description: Mapped[str | None] = mapped_column(Text)
    totals: Mapped[Any] = deferred(mapped_column(JSON, nullable=True))
    # per-tensor {name: {encoding, op, shape, dtype, stats}}
    stats: Mapped[Any] = deferred(mapped_column(JSON, nullable=True))
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)


class PatchFileRow(RowBase):
    """One file of a patch directory, stored as a blob."""

    __tablename__ = "patch_files"

    patch_id: Mapped[int] = mapped_column(ForeignKey("patches.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(500), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)


class PatchParentRow(RowBase):
    """Lineage edge: ``child`` was ported from / merged from / derived from ``parent``."""

    __tablename__ = "patch_parents"

    child_id: Mapped[int] = mapped_column(ForeignKey("patches.id", ondelete="CASCADE"), primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("patches.id"), primary_key=True, index=True)
    relation: Mapped[str] = mapped_column(String(32), nullable=False)  # "port" | "merge" | "derived"
    position: Mapped[int] = mapped_column(Integer, nullable=False, default=0)


class DerivedModelRow(RowBase):
    """A full model made by applying or porting a patch onto a base; ``path`` is where it lives."""

    __tablename__ = "derived_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patch_id: Mapped[int] = mapped_column(ForeignKey("patches.id"), nullable=False, index=True)
    base_version_id: Mapped[int | None] = mapped_column(ForeignKey("base_versions.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)  # "apply" | "port" | ...
    path: Mapped[str] = mapped_column(Text, nullable=False)
    parameters: Mapped[Any] = mapped_column(JSON, nullable=True)
    content: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)


class AliasRow(RowBase):
    """A movable name (``prod``, ``latest``...) scoped to a family (for bases) or a patch name."""

    __tablename__ = "aliases"
    __table_args__ = (
        UniqueConstraint("scope_kind", "scope", "name", name="uq_aliases_scope_name"),
        CheckConstraint("(base_version_id IS NULL) <> (patch_id IS NULL)", name="ck_aliases_one_target"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    scope_kind: Mapped[str] = mapped_column(String(16), nullable=False)  # "family" | "patch"
    scope: Mapped[str] = mapped_column(String(200), nullable=False)
    base_version_id: Mapped[int | None] = mapped_column(ForeignKey("base_versions.id"), index=True)
    patch_id: Mapped[int | None] = mapped_column(ForeignKey("patches.id"), index=True)
    updated_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)


# ---- revision 0002 -------------------------------------------------------------------------------


class TagRow(RowBase):
    """A free-form label on a patch or a base version."""

    __tablename__ = "tags"
    __table_args__ = (
        UniqueConstraint("tag", "patch_id", name="uq_tags_tag_patch"),
        UniqueConstraint("tag", "base_version_id", name="uq_tags_tag_base"),
        CheckConstraint("(base_version_id IS NULL) <> (patch_id IS NULL)", name="ck_tags_one_target"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tag: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    patch_id: Mapped[int | None] = mapped_column(ForeignKey("patches.id", ondelete="CASCADE"), index=True)
    base_version_id: Mapped[int | None] = mapped_column(ForeignKey("base_versions.id", ondelete="CASCADE"), index=True)


class EvaluationRow(RowBase):
    """One evaluation run of a model on a dataset: aggregate metrics plus per-instance results."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patch_id: Mapped[int | None] = mapped_column(ForeignKey("patches.id", ondelete="CASCADE"), index=True)
    base_version_id: Mapped[int | None] = mapped_column(ForeignKey("base_versions.id", ondelete="CASCADE"), index=True)
    derived_id: Mapped[int | None] = mapped_column(ForeignKey("derived_models.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(Text, nullable=False)  # what was evaluated, as the user named it
    dataset: Mapped[str] = mapped_column(String(500), nullable=False)
    metrics: Mapped[Any] = mapped_column(JSON, nullable=True)
    num_instances: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    settings: Mapped[Any] = mapped_column(JSON, nullable=True)  # revision 0003


class EvaluationResultRow(RowBase):
    __tablename__ = "evaluation_results"

    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"), primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(500), primary_key=True)
    prediction: Mapped[Any] = mapped_column(JSON, nullable=True)
    gold: Mapped[Any] = mapped_column(JSON, nullable=True)
    correct: Mapped[bool | None] = mapped_column(Boolean)
    score: Mapped[float | None] = mapped_column(Float)
    details: Mapped[Any] = mapped_column(JSON, nullable=True)  # revision 0003: everything else of the record
    position: Mapped[int | None] = mapped_column(Integer)  # revision 0003: order as recorded


# ---- revision 0004 -------------------------------------------------------------------------------


class PushRow(RowBase):
    """One push of a patch (as a patch or a PEFT adapter) or a derived model to a Hub repo."""

    __tablename__ = "pushes"
    __table_args__ = (
        Index("ix_pushes_repo_branch", "endpoint", "repo_id", "branch"),
        CheckConstraint("(patch_id IS NULL) <> (derived_id IS NULL)", name="ck_pushes_one_source"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    endpoint: Mapped[str] = mapped_column(Text, nullable=False)  # which Hub (https://huggingface.co, a mirror)
    repo_id: Mapped[str] = mapped_column(String(200), nullable=False)
    revision: Mapped[str] = mapped_column(String(200), nullable=False)  # the branch, or refs/pr/N
    branch: Mapped[str] = mapped_column(String(200), nullable=False)  # the branch it was based on
    commit_sha: Mapped[str] = mapped_column(String(64), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # "patch" | "peft" | "model"
    patch_id: Mapped[int | None] = mapped_column(ForeignKey("patches.id", ondelete="CASCADE"), index=True)
    derived_id: Mapped[int | None] = mapped_column(ForeignKey("derived_models.id", ondelete="CASCADE"), index=True)
    created_commit: Mapped[bool] = mapped_column(Boolean, nullable=False)
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)


# ---- revision 0006: gates, upgrade runs, leases, watches --------------------------------------------


class GateRow(RowBase):
    """What judges a patch name (``scope_kind`` "patch") or, as defaults, a family's patches ("family"):
    its evaluation suite (task files), gate expressions, the alias to move, and the vocabulary policy."""

    __tablename__ = "gates"
    __table_args__ = (UniqueConstraint("scope_kind", "scope", name="uq_gates_scope"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope_kind: Mapped[str] = mapped_column(String(16), nullable=False)  # "patch" | "family"
    scope: Mapped[str] = mapped_column(String(200), nullable=False)
    suite: Mapped[Any] = mapped_column(JSON, nullable=True)  # [task file path, ...]
    expressions: Mapped[Any] = mapped_column(JSON, nullable=True)  # [gate expression, ...]
    alias: Mapped[str | None] = mapped_column(String(200))
    vocab_policy: Mapped[str | None] = mapped_column(String(32))
    updated_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)


class UpgradeRunRow(RowBase):
    """One ``patchlab upgrade FAMILY --to VERSION``: resumed by running the same command again."""

    __tablename__ = "upgrade_runs"
    __table_args__ = (Index("ix_upgrade_runs_family_to", "family", "to_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    family: Mapped[str] = mapped_column(String(200), nullable=False)
    from_version: Mapped[str | None] = mapped_column(String(200))
    to_version: Mapped[str] = mapped_column(String(200), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)  # running | done | failed
    options: Mapped[Any] = mapped_column(JSON, nullable=True)
    work_dir: Mapped[str] = mapped_column(Text, nullable=False)
    failed_step: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[Any] = mapped_column(JSON, nullable=True)
    started_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    updated_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    finished_at: Mapped[_dt.datetime | None] = mapped_column(DateTime)


class UpgradeStepRow(RowBase):
    """One step of one patch in an upgrade run; ``done`` only once what it made (files, rows) exists."""

    __tablename__ = "upgrade_steps"
    __table_args__ = (UniqueConstraint("run_id", "patch", "step", name="uq_upgrade_steps_run_patch_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("upgrade_runs.id", ondelete="CASCADE"), nullable=False, index=True)
    patch: Mapped[str] = mapped_column(String(200), nullable=False)  # the patch name
    source: Mapped[str] = mapped_column(String(220), nullable=False)  # the version being upgraded, name@n
    position: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    step: Mapped[str] = mapped_column(String(32), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)  # pending | running | done | failed | skipped
    outcome: Mapped[Any] = mapped_column(JSON, nullable=True)
    output_path: Mapped[str | None] = mapped_column(Text)
    report_path: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    started_at: Mapped[_dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[_dt.datetime | None] = mapped_column(DateTime)
    seconds: Mapped[float | None] = mapped_column(Float)


class LeaseRow(RowBase):
    """Who is running the upgrade of ``key`` (family@version) right now, until ``expires_at``."""

    __tablename__ = "leases"

    key: Mapped[str] = mapped_column(String(420), primary_key=True)
    run_id: Mapped[int | None] = mapped_column(Integer)
    holder_pid: Mapped[int] = mapped_column(Integer, nullable=False)
    holder_host: Mapped[str] = mapped_column(String(255), nullable=False)
    token: Mapped[str] = mapped_column(String(64), nullable=False)
    acquired_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    expires_at: Mapped[_dt.datetime] = mapped_column(DateTime, nullable=False)


class WatchRow(RowBase):
    """The last release a watch of ``source`` (dir:PATH, hub:ORG/REPO#branch...) has seen for ``family``."""

    __tablename__ = "watches"
    __table_args__ = (UniqueConstraint("family", "source", name="uq_watches_family_source"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    family: Mapped[str] = mapped_column(String(200), nullable=False)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    last_seen: Mapped[str | None] = mapped_column(Text)
    seen: Mapped[Any] = mapped_column(JSON, nullable=True)  # every release key seen so far
    updated_at: Mapped[_dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
