"""How far a release moved from an older one, per tensor: measured when the newer release is registered, reused
by every upgrade and diagnosis between the two (issue 14).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "base_drifts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("source_id", sa.Integer, sa.ForeignKey("base_versions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("target_id", sa.Integer, sa.ForeignKey("base_versions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("source_content", sa.String(128), nullable=False),
        sa.Column("target_content", sa.String(128), nullable=False),
        sa.Column("sums", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("source_id", "target_id", name="uq_base_drifts_pair"),
    )
    op.create_index("ix_base_drifts_target_id", "base_drifts", ["target_id"])


def downgrade() -> None:
    op.drop_index("ix_base_drifts_target_id", table_name="base_drifts")
    op.drop_table("base_drifts")
