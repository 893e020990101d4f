"""latency sketches: per minute and group, calls by log-spaced latency bin (percentiles to 1 %)

Revision ID: 0006
Revises: 0005

Minutes aggregated before have no bins: their percentiles still come from the coarse histogram
columns of ``usage_minutes`` (the report falls back to them when a group's bins do not cover all
of its calls).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import libs.common.db

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_latency_bins",
        sa.Column("minute", libs.common.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("credential_id", sa.String(length=255), nullable=False),
        sa.Column("endpoint", sa.String(length=255), nullable=False),
        sa.Column("metric", sa.String(length=16), nullable=False),
        sa.Column("bin", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("count", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint(
            "minute",
            "project",
            "model",
            "credential_id",
            "endpoint",
            "metric",
            "bin",
            name=op.f("pk_usage_latency_bins"),
        ),
    )
    with op.batch_alter_table("usage_latency_bins", schema=None) as batch_op:
        batch_op.create_index("ix_usage_latency_bins_minute_only", ["minute"], unique=False)
        batch_op.create_index(
            "ix_usage_latency_bins_project_minute", ["project", "minute"], unique=False
        )


def downgrade() -> None:
    op.drop_table("usage_latency_bins")
