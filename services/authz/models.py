"""Authz tables: projects, members, platform admins, API keys, entitlements."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from libs.common.db import UTCDateTime, new_id, new_metadata, utcnow
from libs.common.outbox import define_bus_tables

metadata = new_metadata()
bus_tables = define_bus_tables(metadata)


class Base(DeclarativeBase):
    metadata = metadata
    type_annotation_map = {datetime: UTCDateTime}


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    display_name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(255))


class Member(Base):
    """A subject's role in one project. Subjects are OIDC ``sub`` values or local names."""

    __tablename__ = "members"
    __table_args__ = (UniqueConstraint("project_id", "subject"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    subject: Mapped[str] = mapped_column(String(255), index=True)
    role: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PlatformAdmin(Base):
    __tablename__ = "platform_admins"

    subject: Mapped[str] = mapped_column(String(255), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """Only the peppered HMAC of the key is kept; the key itself is shown once at creation."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(8), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(100))
    # None for platform keys, which act as platform-admin across projects.
    project_id: Mapped[str | None] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    owner: Mapped[str] = mapped_column(String(255), index=True)
    role: Mapped[str] = mapped_column(String(32))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    rotated_to: Mapped[str | None] = mapped_column(String(8))


class Entitlement(Base):
    """A project may use a catalog asset (granted by an approved access request or an admin)."""

    __tablename__ = "entitlements"
    __table_args__ = (UniqueConstraint("project_id", "asset_kind", "asset_name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    asset_kind: Mapped[str] = mapped_column(String(32))
    asset_name: Mapped[str] = mapped_column(String(255))
    granted_at: Mapped[datetime] = mapped_column(default=utcnow)
    granted_by: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(String(500), default="")
    # An MCP server's grant may cover less of it: tools of these access types, these tools.
    tool_access: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    tools: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    # A model's fallback chain (the project's choice): gateway model names, tried in order.
    fallbacks: Mapped[list[str] | None] = mapped_column(JSON, default=None)


class ReplicaRevision(Base):
    """One counter that every committed change the gateway's replica mirrors (keys,
    entitlements, members) advances: a gateway without events asks "anything since N?" and gets
    a 304 for the price of one row read."""

    __tablename__ = "replica_revision"

    id: Mapped[int] = mapped_column(primary_key=True)
    revision: Mapped[int] = mapped_column(BigInteger, default=0)
