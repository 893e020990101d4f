"""quota counters by gateway: the part of each window's count one gateway process made

Revision ID: 0005
Revises: 0004

A gateway's ledger takes metering's count of the other gateways' calls and its own exact count of
its own; metering now says how much of each window's count came from which gateway process.
Windows counted before have no such rows: their usage reads as the other gateways'.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import libs.common.db

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "quota_gateway_counters",
        sa.Column("quota_id", sa.String(length=36), nullable=False),
        sa.Column("window_start", libs.common.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("gateway_id", sa.String(length=64), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["quota_id"],
            ["quotas.id"],
            name=op.f("fk_quota_gateway_counters_quota_id_quotas"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "quota_id", "window_start", "gateway_id", name=op.f("pk_quota_gateway_counters")
        ),
    )


def downgrade() -> None:
    op.drop_table("quota_gateway_counters")
