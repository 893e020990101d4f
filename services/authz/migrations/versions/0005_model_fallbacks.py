"""model fallbacks: a project's fallback chain for a model it is entitled to

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("entitlements") as batch:
        batch.add_column(sa.Column("fallbacks", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("entitlements") as batch:
        batch.drop_column("fallbacks")
