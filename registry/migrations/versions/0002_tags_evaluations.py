"""Tags on patches and base versions; evaluations with per-instance results.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tags",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tag", sa.String(200), nullable=False),
        sa.Column("patch_id", sa.Integer, sa.ForeignKey("patches.id", ondelete="CASCADE")),
        sa.Column("base_version_id", sa.Integer, sa.ForeignKey("base_versions.id", ondelete="CASCADE")),
        sa.UniqueConstraint("tag", "patch_id", name="uq_tags_tag_patch"),
        sa.UniqueConstraint("tag", "base_version_id", name="uq_tags_tag_base"),
        sa.CheckConstraint("(base_version_id IS NULL) <> (patch_id IS NULL)", name="ck_tags_one_target"),
    )
    op.create_index("ix_tags_tag", "tags", ["tag"])
    op.create_index("ix_tags_patch_id", "tags", ["patch_id"])
    op.create_index("ix_tags_base_version_id", "tags", ["base_version_id"])
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("patch_id", sa.Integer, sa.ForeignKey("patches.id", ondelete="CASCADE")),
        sa.Column("base_version_id", sa.Integer, sa.ForeignKey("base_versions.id", ondelete="CASCADE")),
        sa.Column("derived_id", sa.Integer, sa.ForeignKey("derived_models.id", ondelete="CASCADE")),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("dataset", sa.String(500), nullable=False),
        sa.Column("metrics", sa.JSON),
        sa.Column("num_instances", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_evaluations_patch_id", "evaluations", ["patch_id"])
    op.create_index("ix_evaluations_base_version_id", "evaluations", ["base_version_id"])
    op.create_index("ix_evaluations_derived_id", "evaluations", ["derived_id"])
    op.create_table(
        "evaluation_results",
        sa.Column("evaluation_id", sa.Integer, sa.ForeignKey("evaluations.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("instance_id", sa.String(500), primary_key=True),
        sa.Column("prediction", sa.JSON),
        sa.Column("gold", sa.JSON),
        sa.Column("correct", sa.Boolean),
        sa.Column("score", sa.Float),
    )


def downgrade() -> None:
    op.drop_table("evaluation_results")
    op.drop_table("evaluations")
    op.drop_table("tags")
