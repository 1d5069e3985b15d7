"""Evaluation settings, per-instance details and order, so a stored evaluation round-trips an EvalResult.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("evaluations") as batch:
        batch.add_column(sa.Column("settings", sa.JSON, nullable=True))
    with op.batch_alter_table("evaluation_results") as batch:
        batch.add_column(sa.Column("details", sa.JSON, nullable=True))
        batch.add_column(sa.Column("position", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("evaluation_results") as batch:
        batch.drop_column("position")
        batch.drop_column("details")
    with op.batch_alter_table("evaluations") as batch:
        batch.drop_column("settings")
