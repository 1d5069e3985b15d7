"""Initial schema: families, base versions, patches and their files, lineage, derived models, aliases.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "families",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "base_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("family_id", sa.Integer, sa.ForeignKey("families.id"), nullable=False),
        sa.Column("version", sa.String(200), nullable=False),
        sa.Column("source_kind", sa.String(16), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("revision", sa.String(200)),
        sa.Column("architecture", sa.String(128)),
        sa.Column("content", sa.String(128)),
        sa.Column("num_parameters", sa.BigInteger),
        sa.Column("dtype", sa.String(32)),
        sa.Column("vocab_size", sa.Integer),
        sa.Column("release_order", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("family_id", "version", name="uq_base_versions_family_version"),
    )
    op.create_index("ix_base_versions_family_id", "base_versions", ["family_id"])
    op.create_index("ix_base_versions_content", "base_versions", ["content"])
    op.create_table(
        "patches",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("base_version_id", sa.Integer, sa.ForeignKey("base_versions.id")),
        sa.Column("base_architecture", sa.String(128)),
        sa.Column("base_content", sa.String(128)),
        sa.Column("finetuned", sa.Text),
        sa.Column("encoding", sa.String(32)),
        sa.Column("method", sa.String(64)),
        sa.Column("parameters", sa.JSON),
        sa.Column("num_tensors", sa.Integer, nullable=False),
        sa.Column("format_version", sa.String(32)),
        sa.Column("description", sa.Text),
        sa.Column("totals", sa.JSON),
        sa.Column("stats", sa.JSON),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_patches_name_version"),
    )
    op.create_index("ix_patches_digest", "patches", ["digest"])
    op.create_index("ix_patches_base_version_id", "patches", ["base_version_id"])
    op.create_index("ix_patches_created_at", "patches", ["created_at"])
    op.create_table(
        "patch_files",
        sa.Column("patch_id", sa.Integer, sa.ForeignKey("patches.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("name", sa.String(500), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_patch_files_digest", "patch_files", ["digest"])
    op.create_table(
        "patch_parents",
        sa.Column("child_id", sa.Integer, sa.ForeignKey("patches.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("parent_id", sa.Integer, sa.ForeignKey("patches.id"), primary_key=True),
        sa.Column("relation", sa.String(32), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
    )
    op.create_index("ix_patch_parents_parent_id", "patch_parents", ["parent_id"])
    op.create_table(
        "derived_models",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("patch_id", sa.Integer, sa.ForeignKey("patches.id"), nullable=False),
        sa.Column("base_version_id", sa.Integer, sa.ForeignKey("base_versions.id")),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("parameters", sa.JSON),
        sa.Column("content", sa.String(128)),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_derived_models_patch_id", "derived_models", ["patch_id"])
    op.create_index("ix_derived_models_base_version_id", "derived_models", ["base_version_id"])
    op.create_table(
        "aliases",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("scope_kind", sa.String(16), nullable=False),
        sa.Column("scope", sa.String(200), nullable=False),
        sa.Column("base_version_id", sa.Integer, sa.ForeignKey("base_versions.id")),
        sa.Column("patch_id", sa.Integer, sa.ForeignKey("patches.id")),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("scope_kind", "scope", "name", name="uq_aliases_scope_name"),
        sa.CheckConstraint("(base_version_id IS NULL) <> (patch_id IS NULL)", name="ck_aliases_one_target"),
    )
    op.create_index("ix_aliases_base_version_id", "aliases", ["base_version_id"])
    op.create_index("ix_aliases_patch_id", "aliases", ["patch_id"])


def downgrade() -> None:
    for table in (
        "aliases",
        "derived_models",
        "patch_parents",
        "patch_files",
        "patches",
        "base_versions",
        "families",
    ):
        op.drop_table(table)
