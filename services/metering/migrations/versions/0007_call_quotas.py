"""call quotas, call bytes, errors by cause: a quota may limit calls per window (model calls,
MCP tool calls); usage keeps the bytes of MCP tool calls and counts its errors by cause

Revision ID: 0007
Revises: 0006

Counters already counted every call; from now on they count the calls the gateway admitted
(``UsageRecorded.admitted``), and each gateway's part of them too. Earlier usage has no bytes
(0 in the aggregates, none in the raw events).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# New per-minute sums: MCP bytes, and the errors by cause (429, other 4xx, 5xx or broken off).
COUNTERS = (
    "request_bytes",
    "response_bytes",
    "rate_limited",
    "client_errors",
    "server_errors",
)


def upgrade() -> None:
    with op.batch_alter_table("quotas", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_limit", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("quota_gateway_counters", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("requests", sa.BigInteger(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_bytes", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("response_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("usage_minutes", schema=None) as batch_op:
        for name in COUNTERS:
            batch_op.add_column(
                sa.Column(name, sa.BigInteger(), server_default="0", nullable=False)
            )


def downgrade() -> None:
    with op.batch_alter_table("usage_minutes", schema=None) as batch_op:
        for name in reversed(COUNTERS):
            batch_op.drop_column(name)
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.drop_column("response_bytes")
        batch_op.drop_column("request_bytes")
    with op.batch_alter_table("quota_gateway_counters", schema=None) as batch_op:
        batch_op.drop_column("requests")
    with op.batch_alter_table("quotas", schema=None) as batch_op:
        batch_op.drop_column("request_limit")
