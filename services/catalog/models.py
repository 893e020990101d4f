"""Catalog tables: assets, their versions, and the versions' tags (a table, so that filtering by
tag is an indexed join on both SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from libs.common.db import UTCDateTime, new_id, new_metadata, utcnow
from libs.common.outbox import define_bus_tables

metadata = new_metadata()
bus_tables = define_bus_tables(metadata)


class Base(DeclarativeBase):
    metadata = metadata
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Asset(Base):
    """A model or an MCP server, known across services by ``(kind, name)``."""

    __tablename__ = "assets"
    __table_args__ = (UniqueConstraint("kind", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(255), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(255))


class Version(Base):
    """One immutable version of an asset; only ``status`` (and its bookkeeping) changes once
    the version leaves ``draft``."""

    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("asset_id", "version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    asset_id: Mapped[str] = mapped_column(ForeignKey("assets.id", ondelete="CASCADE"), index=True)
    version: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    provider: Mapped[str] = mapped_column(String(255), default="", index=True)
    # The normalised record (provenance, serving hints, MCP packages/remotes…), as imported.
    spec: Mapped[dict[str, Any]]
    # Also in version_tags for filtering; kept here so reads need no join.
    tags: Mapped[list[Any]]
    tools: Mapped[list[Any]]
    checklist: Mapped[list[Any]]
    # sha256 of the canonical spec: re-importing the same entry is recognised as unchanged.
    content_hash: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    status_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    status_reason: Mapped[str] = mapped_column(String(500), default="")
    # The approval request that last moved the version (submitted/approved/back to draft).
    request_id: Mapped[str | None] = mapped_column(String(36))


class VersionTag(Base):
    __tablename__ = "version_tags"

    version_id: Mapped[str] = mapped_column(
        ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
