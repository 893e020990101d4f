"""Inference tables: endpoints (with their lead-time clock) and versions the catalog revoked."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from libs.common.db import UTCDateTime, new_id, new_metadata, utcnow
from libs.common.events.inference import HOLDS_GPUS
from libs.common.outbox import define_bus_tables

metadata = new_metadata()
bus_tables = define_bus_tables(metadata)

# Statuses in which an endpoint holds its route name (the partial index below spells the same
# list in SQL): a route name is free again once its endpoint is deleted. Its GPUs go earlier
# (``HOLDS_GPUS``: not while deleting).
LIVE = (*HOLDS_GPUS, "deleting")
_LIVE_SQL = "status IN ({})".format(", ".join(f"'{s}'" for s in LIVE))


class Base(DeclarativeBase):
    metadata = metadata
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Endpoint(Base):
    """An approved model version served for one project by one runtime, or an approved MCP
    server version run from its stdio package (``asset_kind``)."""

    __tablename__ = "endpoints"
    __table_args__ = (
        # Two live endpoints never share a route name (the gateway keys its table by it).
        Index(
            "uq_endpoints_live_route_name",
            "route_name",
            unique=True,
            postgresql_where=text(_LIVE_SQL),
            sqlite_where=text(_LIVE_SQL),
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    project: Mapped[str] = mapped_column(String(63), index=True)
    asset_kind: Mapped[str] = mapped_column(String(16), default="model", server_default="model")
    asset_name: Mapped[str] = mapped_column(String(255), index=True)
    version: Mapped[str] = mapped_column(String(100))
    # Where the weights come from (the catalog version's source URI), when known.
    source_uri: Mapped[str | None] = mapped_column(String(1000))
    runtime: Mapped[str] = mapped_column(String(16))
    # The local runtime's profile (simulator, vllm…); unused by the other runtimes.
    profile: Mapped[str | None] = mapped_column(String(64))
    replicas: Mapped[int] = mapped_column(Integer)
    gpus: Mapped[int] = mapped_column(Integer)  # per replica
    gpu_type: Mapped[str | None] = mapped_column(String(64))  # the pool type allocated
    served_model_name: Mapped[str] = mapped_column(String(255))
    route_name: Mapped[str] = mapped_column(String(255))
    network_exposure: Mapped[str] = mapped_column(String(16), default="project")
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    upstream_url: Mapped[str | None] = mapped_column(String(1000))
    # The healthy replicas' URLs, when the gateway balances them (local runtime).
    upstream_urls: Mapped[list[str] | None] = mapped_column(JSON)
    # Fernet token of an external upstream's credential; never the plaintext.
    upstream_credential: Mapped[str | None] = mapped_column(Text)
    # An MCP server: the stdio package it runs (libs/common/mcp_packages.StdioPackage), as the
    # catalog version said when the endpoint was made, and its environment (a Fernet token).
    package: Mapped[dict[str, Any] | None]
    sealed_environment: Mapped[str | None] = mapped_column(Text)
    # Runtime's name for it: a Kubernetes object name, a process label.
    runtime_name: Mapped[str] = mapped_column(String(63))
    # The runtime's resources are gone (set when a failed/stopped/deleted endpoint is cleaned).
    released: Mapped[bool] = mapped_column(default=False)
    owner: Mapped[str] = mapped_column(String(255))
    # Unique: a redelivered approval never provisions a second endpoint.
    request_id: Mapped[str | None] = mapped_column(String(36), unique=True)
    plan: Mapped[dict[str, Any] | None]
    # Lead time: request filed → approved → ready (direct creation: filed = approved = created).
    requested_at: Mapped[datetime]
    approved_at: Mapped[datetime]
    ready_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    status_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None]


class RevokedVersion(Base):
    """Versions the catalog revoked (heard on ``catalog.version.revoked``): an approval that
    arrives after the revocation must not deploy them."""

    __tablename__ = "revoked_versions"

    asset_name: Mapped[str] = mapped_column(String(255), primary_key=True)
    version: Mapped[str] = mapped_column(String(100), primary_key=True)
    revoked_at: Mapped[datetime] = mapped_column(default=utcnow)
