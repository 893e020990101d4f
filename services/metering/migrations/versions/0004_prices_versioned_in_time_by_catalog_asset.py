"""prices versioned in time, by catalog asset (and version)

Revision ID: 0004
Revises: 0003
Create Date: 2027-01-12 10:00:00

``model_prices`` held one price per name, edited in place. ``prices`` holds every version in
time of a catalog asset's price (or of one version of the asset): a change adds a row from its
``effective_from`` on. Each existing price becomes the asset's price (every version) from the
time it was last set, which is when it started to apply. A price that was set on a route name
rather than a catalog asset name is carried over as it is and no longer matches any call: price
the asset instead.

Downgrade keeps, per asset, the asset-wide price in force at the time of the downgrade; version
prices, scheduled prices and the history are lost.
"""

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

import libs.common.db

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_old = sa.table(
    "model_prices",
    sa.column("model", sa.String),
    sa.column("input_per_1k_nanos", sa.BigInteger),
    sa.column("output_per_1k_nanos", sa.BigInteger),
    sa.column("gpu_hour_nanos", sa.BigInteger),
    sa.column("updated_at", libs.common.db.UTCDateTime(timezone=True)),
    sa.column("updated_by", sa.String),
)
_new = sa.table(
    "prices",
    sa.column("id", sa.String),
    sa.column("asset", sa.String),
    sa.column("version", sa.String),
    sa.column("effective_from", libs.common.db.UTCDateTime(timezone=True)),
    sa.column("input_per_1k_nanos", sa.BigInteger),
    sa.column("output_per_1k_nanos", sa.BigInteger),
    sa.column("gpu_hour_nanos", sa.BigInteger),
    sa.column("withdrawn", sa.Boolean),
    sa.column("created_at", libs.common.db.UTCDateTime(timezone=True)),
    sa.column("created_by", sa.String),
)


def upgrade() -> None:
    op.create_table(
        "prices",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("asset", sa.String(length=255), nullable=False),
        sa.Column("version", sa.String(length=100), nullable=False),
        sa.Column("effective_from", libs.common.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("input_per_1k_nanos", sa.BigInteger(), nullable=False),
        sa.Column("output_per_1k_nanos", sa.BigInteger(), nullable=False),
        sa.Column("gpu_hour_nanos", sa.BigInteger(), nullable=True),
        sa.Column("withdrawn", sa.Boolean(), nullable=False),
        sa.Column("created_at", libs.common.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prices")),
        sa.UniqueConstraint("asset", "version", "effective_from", name=op.f("uq_prices_asset")),
    )
    bind = op.get_bind()
    rows = [
        {
            "id": str(uuid.uuid4()),
            "asset": r.model,
            "version": "",
            "effective_from": r.updated_at,
            "input_per_1k_nanos": r.input_per_1k_nanos,
            "output_per_1k_nanos": r.output_per_1k_nanos,
            "gpu_hour_nanos": r.gpu_hour_nanos,
            "withdrawn": False,
            "created_at": r.updated_at,
            "created_by": r.updated_by,
        }
        for r in bind.execute(sa.select(_old))
    ]
    if rows:
        op.bulk_insert(_new, rows)
    op.drop_table("model_prices")


def downgrade() -> None:
    op.create_table(
        "model_prices",
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("input_per_1k_nanos", sa.BigInteger(), nullable=False),
        sa.Column("output_per_1k_nanos", sa.BigInteger(), nullable=False),
        sa.Column("gpu_hour_nanos", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", libs.common.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("model", name=op.f("pk_model_prices")),
    )
    bind = op.get_bind()
    now = datetime.now(UTC)
    in_force: dict[str, sa.Row[tuple[object, ...]]] = {}
    query = (
        sa.select(_new)
        .where(_new.c.version == "", _new.c.effective_from <= now)
        .order_by(_new.c.asset, _new.c.effective_from)
    )
    for r in bind.execute(query):
        in_force[r.asset] = r  # the latest row of each asset wins
    rows = [
        {
            "model": r.asset,
            "input_per_1k_nanos": r.input_per_1k_nanos,
            "output_per_1k_nanos": r.output_per_1k_nanos,
            "gpu_hour_nanos": r.gpu_hour_nanos,
            "updated_at": r.effective_from,
            "updated_by": r.created_by,
        }
        for r in in_force.values()
        if not r.withdrawn
    ]
    if rows:
        op.bulk_insert(_old, rows)
    op.drop_table("prices")
