"""failover lifecycle and plan runs

Revision ID: 0002
Revises: 0001
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("protections") as b:
        b.add_column(sa.Column("home_site", sa.String(length=64), nullable=True))
        b.add_column(sa.Column("generation", sa.Integer(), nullable=False, server_default="1"))
    with op.batch_alter_table("failovers") as b:
        b.add_column(sa.Column("running_at", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("point_time", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("data_loss_seconds", sa.Float(), nullable=True))
        b.add_column(sa.Column("run_id", sa.Integer(), nullable=True))
        b.add_column(sa.Column("committed_at", sa.DateTime(timezone=True), nullable=True))
        b.create_index("ix_failovers_run_id", ["run_id"], unique=False)
    op.create_table(
        "plan_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("plan_name", sa.String(length=128), nullable=False),
        sa.Column("plan_path", sa.Text(), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "run_steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("group_name", sa.String(length=64), nullable=False),
        sa.Column("vm", sa.String(length=128), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("output", sa.Text(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["plan_runs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("run_steps") as b:
        b.create_index("ix_run_steps_run_id", ["run_id"], unique=False)


def downgrade() -> None:
    op.drop_table("run_steps")
    op.drop_table("plan_runs")
    with op.batch_alter_table("failovers") as b:
        b.drop_index("ix_failovers_run_id")
        for col in ("committed_at", "run_id", "data_loss_seconds", "point_time", "running_at"):
            b.drop_column(col)
    with op.batch_alter_table("protections") as b:
        b.drop_column("generation")
        b.drop_column("home_site")
