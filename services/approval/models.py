"""Approval tables: requests and their comments, auto-approve policies, and the audit log
(append-only, hash-chained, with a one-row head recording where the chain ends)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, String, Text, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from libs.common.db import UTCDateTime, new_id, new_metadata, utcnow
from libs.common.outbox import define_bus_tables

metadata = new_metadata()
bus_tables = define_bus_tables(metadata)


class Base(DeclarativeBase):
    metadata = metadata
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Request(Base):
    __tablename__ = "requests"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    project: Mapped[str] = mapped_column(String(63), index=True)
    requester: Mapped[str] = mapped_column(String(255), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    payload: Mapped[dict[str, Any]]
    # Copied out of the payload so that duplicates and queues are simple indexed queries.
    asset_kind: Mapped[str | None] = mapped_column(String(32))
    asset_name: Mapped[str | None] = mapped_column(String(255), index=True)
    asset_version: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    due_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)
    decided_at: Mapped[datetime | None]
    decided_by: Mapped[str | None] = mapped_column(String(255))
    decision_comment: Mapped[str] = mapped_column(Text, default="")
    policy: Mapped[str | None] = mapped_column(String(100))
    lead_time_seconds: Mapped[float | None]


class Comment(Base):
    __tablename__ = "comments"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    request_id: Mapped[str] = mapped_column(
        ForeignKey("requests.id", ondelete="CASCADE"), index=True
    )
    author: Mapped[str] = mapped_column(String(255))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Policy(Base):
    """A declarative auto-approve rule (see ``policies.matches``)."""

    __tablename__ = "policies"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    rule: Mapped[dict[str, Any]]
    enabled: Mapped[bool]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(255))


class AuditRecord(Base):
    """One audit event. ``hash`` covers the other columns (not ``keyed``, which picks how) and the
    previous record's hash."""

    __tablename__ = "audit_records"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    service: Mapped[str] = mapped_column(String(32), index=True)
    actor: Mapped[str] = mapped_column(String(255), index=True)
    action: Mapped[str] = mapped_column(String(100), index=True)
    target: Mapped[str] = mapped_column(String(500))
    project: Mapped[str | None] = mapped_column(String(63), index=True)
    before: Mapped[dict[str, Any] | None]
    after: Mapped[dict[str, Any] | None]
    request_id: Mapped[str | None] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(index=True)
    recorded_at: Mapped[datetime]
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    # HMAC-keyed (false only for records from before the chain was keyed: plain SHA-256).
    keyed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class AuditHead(Base):
    """Where the chain ends: locked while appending, compared by verify (a cut tail shows)."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))
