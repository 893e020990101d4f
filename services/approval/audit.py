"""The tamper-evident audit log: records are appended in a hash chain and verified by replay.

Each record's hash is SHA-256 over its canonical JSON (every stored column, including its
sequence number and the previous record's hash). Editing a record breaks its own hash; deleting
one leaves a gap in the sequence and a broken link; reordering breaks both; cutting the tail no
longer matches the chain head. (Someone able to rewrite the whole table *and* the head can forge
a consistent chain: export ``head`` from ``/v1/audit/verify`` somewhere else to anchor it.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.db import utcnow
from libs.common.events.audit import AuditRecorded
from services.approval import repository as repo
from services.approval.models import AuditHead, AuditRecord

GENESIS = "0" * 64
MAX_PROBLEMS = 100


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def record_hash(record: AuditRecord) -> str:
    canonical = json.dumps(
        {
            "seq": record.seq,
            "event_id": record.event_id,
            "service": record.service,
            "actor": record.actor,
            "action": record.action,
            "target": record.target,
            "project": record.project,
            "before": record.before,
            "after": record.after,
            "request_id": record.request_id,
            "at": _iso(record.at),
            "recorded_at": _iso(record.recorded_at),
            "prev_hash": record.prev_hash,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _jsonable(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the JSON column will give back, so the hash computed now matches the one replayed."""
    if value is None:
        return None
    loaded: dict[str, Any] = json.loads(json.dumps(value, default=str))
    return loaded


async def append(session: AsyncSession, event: AuditRecorded, event_id: str) -> AuditRecord:
    """Add one record at the end of the chain (the head row is locked until commit)."""
    head = await repo.lock_audit_head(session)
    if head is None:
        head = AuditHead(id=1, seq=0, hash=GENESIS)
        session.add(head)
    record = AuditRecord(
        seq=head.seq + 1,
        event_id=event_id,
        service=event.service,
        actor=event.actor,
        action=event.action,
        target=event.target,
        project=event.project,
        before=_jsonable(event.before),
        after=_jsonable(event.after),
        request_id=event.request_id,
        # Stored to the microsecond on both engines, so the replayed hash sees the same time.
        at=event.at.astimezone(UTC),
        recorded_at=utcnow(),
        prev_hash=head.hash,
    )
    record.hash = record_hash(record)
    session.add(record)
    head.seq = record.seq
    head.hash = record.hash
    await session.flush()
    return record


@dataclass
class Verification:
    ok: bool = True
    records: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    problems: list[dict[str, Any]] = field(default_factory=list)

    def problem(self, seq: int | None, kind: str, detail: str) -> None:
        self.ok = False
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append({"seq": seq, "problem": kind, "detail": detail})


async def verify(session: AsyncSession, batch: int = 1000) -> Verification:
    """Replay the whole chain; every edit, deletion or reordering is reported."""
    result = Verification()
    expected_seq, prev = 1, GENESIS
    after = 0
    while True:
        records = await repo.audit_batch(session, after, batch)
        if not records:
            break
        for record in records:
            result.records += 1
            if record.seq != expected_seq:
                result.problem(
                    record.seq,
                    "missing",
                    f"records {expected_seq}..{record.seq - 1} are missing",
                )
            if record.prev_hash != prev:
                result.problem(record.seq, "broken-link", "does not follow the record before it")
            if record_hash(record) != record.hash:
                result.problem(record.seq, "edited", "content does not match its hash")
            expected_seq, prev = record.seq + 1, record.hash
        after = records[-1].seq
    head = await repo.audit_head(session)
    head_seq, head_hash = (head.seq, head.hash) if head else (0, GENESIS)
    result.head_seq, result.head_hash = head_seq, head_hash
    if head_seq != expected_seq - 1 or head_hash != prev:
        result.problem(
            head_seq,
            "truncated",
            f"the chain head is at {head_seq}, the records end at {expected_seq - 1}",
        )
    return result
