"""entitlement tool limits: an MCP server's grant may cover only some access types or tools

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("entitlements") as batch:
        batch.add_column(sa.Column("tool_access", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("tools", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("entitlements") as batch:
        batch.drop_column("tools")
        batch.drop_column("tool_access")
