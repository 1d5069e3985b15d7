"""Gates and suites, upgrade runs and their steps, leases, release watches (issue 14).

Revision ID: 0006
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gates",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("scope_kind", sa.String(16), nullable=False),
        sa.Column("scope", sa.String(200), nullable=False),
        sa.Column("suite", sa.JSON, nullable=True),
        sa.Column("expressions", sa.JSON, nullable=True),
        sa.Column("alias", sa.String(200), nullable=True),
        sa.Column("vocab_policy", sa.String(32), nullable=True),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("scope_kind", "scope", name="uq_gates_scope"),
    )
    op.create_table(
        "upgrade_runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("family", sa.String(200), nullable=False),
        sa.Column("from_version", sa.String(200), nullable=True),
        sa.Column("to_version", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("options", sa.JSON, nullable=True),
        sa.Column("work_dir", sa.Text, nullable=False),
        sa.Column("failed_step", sa.String(200), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("summary", sa.JSON, nullable=True),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime, nullable=True),
    )
    op.create_index("ix_upgrade_runs_family_to", "upgrade_runs", ["family", "to_version"])
    op.create_table(
        "upgrade_steps",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("upgrade_runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("patch", sa.String(200), nullable=False),
        sa.Column("source", sa.String(220), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("step", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("outcome", sa.JSON, nullable=True),
        sa.Column("output_path", sa.Text, nullable=True),
        sa.Column("report_path", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=True),
        sa.Column("finished_at", sa.DateTime, nullable=True),
        sa.Column("seconds", sa.Float, nullable=True),
        sa.UniqueConstraint("run_id", "patch", "step", name="uq_upgrade_steps_run_patch_step"),
    )
    op.create_index("ix_upgrade_steps_run_id", "upgrade_steps", ["run_id"])
    op.create_table(
        "leases",
        sa.Column("key", sa.String(420), primary_key=True),
        sa.Column("run_id", sa.Integer, nullable=True),
        sa.Column("holder_pid", sa.Integer, nullable=False),
        sa.Column("holder_host", sa.String(255), nullable=False),
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("acquired_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "watches",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("family", sa.String(200), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("last_seen", sa.Text, nullable=True),
        sa.Column("seen", sa.JSON, nullable=True),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("family", "source", name="uq_watches_family_source"),
    )


def downgrade() -> None:
    op.drop_table("watches")
    op.drop_table("leases")
    op.drop_index("ix_upgrade_steps_run_id", table_name="upgrade_steps")
    op.drop_table("upgrade_steps")
    op.drop_index("ix_upgrade_runs_family_to", table_name="upgrade_runs")
    op.drop_table("upgrade_runs")
    op.drop_table("gates")
