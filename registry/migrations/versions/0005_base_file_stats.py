"""Per-file sizes and modification times of a local base, recorded at registration, so a base whose files
changed on disk is caught cheaply before it is used (issue 10).

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("base_versions") as batch:
        # {"model.safetensors": [size, mtime_ns], ...}; NULL for Hub bases and bases registered before 0005
        batch.add_column(sa.Column("file_stats", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("base_versions") as batch:
        batch.drop_column("file_stats")
