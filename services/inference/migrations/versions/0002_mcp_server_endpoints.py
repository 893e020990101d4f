"""MCP server endpoints and replica URLs: an endpoint may run an MCP server's stdio package,
and keeps the URL of each serving replica the gateway balances

Revision ID: 0002
Revises: 0001

Every existing endpoint serves a model (``asset_kind`` defaults to it), at its one URL.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("endpoints", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("asset_kind", sa.String(length=16), server_default="model", nullable=False)
        )
        batch_op.add_column(sa.Column("package", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("sealed_environment", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("upstream_urls", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("endpoints", schema=None) as batch_op:
        batch_op.drop_column("upstream_urls")
        batch_op.drop_column("sealed_environment")
        batch_op.drop_column("package")
        batch_op.drop_column("asset_kind")
