"""Pushes to the Hugging Face Hub: what was pushed where (repo, revision, commit), so a later push can refuse
to overwrite a branch that moved, and ``patchlab show`` can list them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pushes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("endpoint", sa.Text, nullable=False),
        sa.Column("repo_id", sa.String(200), nullable=False),
        sa.Column("revision", sa.String(200), nullable=False),
        sa.Column("branch", sa.String(200), nullable=False),
        sa.Column("commit_sha", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("patch_id", sa.Integer, sa.ForeignKey("patches.id", ondelete="CASCADE")),
        sa.Column("derived_id", sa.Integer, sa.ForeignKey("derived_models.id", ondelete="CASCADE")),
        sa.Column("created_commit", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.CheckConstraint("(patch_id IS NULL) <> (derived_id IS NULL)", name="ck_pushes_one_source"),
    )
    op.create_index("ix_pushes_repo_branch", "pushes", ["endpoint", "repo_id", "branch"])
    op.create_index("ix_pushes_patch_id", "pushes", ["patch_id"])
    op.create_index("ix_pushes_derived_id", "pushes", ["derived_id"])


def downgrade() -> None:
    op.drop_table("pushes")
