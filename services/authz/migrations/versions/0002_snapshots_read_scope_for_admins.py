"""snapshots:read for the platform keys of people who manage keys

The replica snapshots moved from ``keys:manage`` (and others) to their own read-only scope, so
the gateway's key can hold that alone. A platform key of a person that could manage keys could
read the snapshots before, and mint a gateway key that can: it keeps both.

Revision ID: 0002
Revises: 0001
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

keys = sa.table(
    "api_keys",
    sa.column("id", sa.String),
    sa.column("project_id", sa.String),
    sa.column("owner", sa.String),
    sa.column("scopes", sa.JSON),
)


def upgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(keys.c.id, keys.c.owner, keys.c.scopes).where(keys.c.project_id.is_(None))
    ).all()
    for key_id, owner, scopes in rows:
        scopes = json.loads(scopes) if isinstance(scopes, str) else list(scopes)
        if owner.startswith("steward-") or "keys:manage" not in scopes:
            continue  # service keys are narrowed at bootstrap, not widened here
        if "snapshots:read" not in scopes:
            conn.execute(
                keys.update()
                .where(keys.c.id == key_id)
                .values(scopes=sorted([*scopes, "snapshots:read"]))
            )


def downgrade() -> None:
    pass  # an extra read scope is harmless to the earlier release
