"""The tamper-evident audit log: records are appended in a keyed hash chain, anchored by signed
checkpoints kept outside the database, and verified by replay.

Each record's hash is HMAC-SHA-256, under a key that is not in the database (``audit_key``),
over its canonical JSON (every stored column, including its sequence number and the previous
record's hash). Editing a record breaks its own hash, and without the key nobody can recompute
it; deleting one leaves a gap and a broken link; reordering breaks both. Every few seconds the
head (sequence and hash) is signed with an Ed25519 key derived from the same secret and written
to a NATS KV bucket and an append-only file: ``verify`` checks the chain against the latest
checkpoint, so a cut tail or a chain rewritten with a stolen HMAC key still shows. Records from
before the chain was keyed (``keyed`` false) are checked with plain SHA-256, and only as a
prefix. docs/operations.md has the threat model.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.bus import Bus
from libs.common.db import utcnow
from libs.common.events.audit import AuditRecorded
from services.approval import repository as repo
from services.approval.models import AuditHead, AuditRecord

log = logging.getLogger("steward.approval.audit")

# Where a session finds the chain's keys (``ServiceSpec.session_info``).
KEYS = "steward.audit_keys"
GENESIS = "0" * 64
MAX_PROBLEMS = 100


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


class AuditKeys:
    """The chain's HMAC key and the checkpoint signing key, both derived from one secret that
    lives outside the database."""

    def __init__(self, secret: bytes) -> None:
        self.mac = hmac.new(secret, b"steward-audit-chain-v1", hashlib.sha256).digest()
        seed = hmac.new(secret, b"steward-audit-checkpoint-v1", hashlib.sha256).digest()
        self._signing = Ed25519PrivateKey.from_private_bytes(seed)
        self.public = self._signing.public_key()

    @property
    def public_key(self) -> str:
        """The checkpoint verification key (raw Ed25519, base64), to check checkpoints offline."""
        raw = self.public.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    def sign(self, seq: int, hash: str, at: datetime) -> Checkpoint:
        unsigned = Checkpoint(seq=seq, hash=hash, at=_iso(at))
        signature = base64.b64encode(self._signing.sign(unsigned.message())).decode()
        return Checkpoint(seq=seq, hash=hash, at=unsigned.at, signature=signature)

    def genuine(self, checkpoint: Checkpoint) -> bool:
        try:
            self.public.verify(base64.b64decode(checkpoint.signature), checkpoint.message())
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class Checkpoint:
    """The chain's head at one moment, signed."""

    seq: int
    hash: str
    at: str
    signature: str = ""

    def message(self) -> bytes:
        return json.dumps(
            {"seq": self.seq, "hash": self.hash, "at": self.at},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Checkpoint | None:
        try:
            data = json.loads(raw)
            return cls(
                seq=int(data["seq"]),
                hash=str(data["hash"]),
                at=str(data["at"]),
                signature=str(data["signature"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


def record_hash(record: AuditRecord, mac: bytes) -> str:
    """HMAC-SHA-256 under ``mac`` of a keyed record; SHA-256 of one from before keying."""
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
    if record.keyed:
        return hmac.new(mac, canonical.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(canonical.encode()).hexdigest()


def _jsonable(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the JSON column will give back, so the hash computed now matches the one replayed."""
    if value is None:
        return None
    loaded: dict[str, Any] = json.loads(json.dumps(value, default=str))
    return loaded


async def append(session: AsyncSession, event: AuditRecorded, event_id: str) -> AuditRecord:
    """Add one record at the end of the chain (the head row is locked until commit). Fails
    closed: without the chain's key nothing is appended (the event is retried)."""
    keys: AuditKeys | None = session.info.get(KEYS)
    if keys is None:
        raise RuntimeError("the audit chain's key is not configured on this session")
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
        keyed=True,
    )
    record.hash = record_hash(record, keys.mac)
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
    checkpoint: Checkpoint | None = None
    problems: list[dict[str, Any]] = field(default_factory=list)

    def problem(self, seq: int | None, kind: str, detail: str) -> None:
        self.ok = False
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append({"seq": seq, "problem": kind, "detail": detail})


async def verify(
    session: AsyncSession,
    keys: AuditKeys,
    checkpoint: Checkpoint | None = None,
    batch: int = 1000,
) -> Verification:
    """Replay the whole chain; every edit, deletion or reordering is reported, and so is a chain
    that ends before, or differs at, the latest signed ``checkpoint``."""
    if session.get_bind().dialect.name == "postgresql":
        # One snapshot for the records and the head: a record committed (with its head, in one
        # transaction) while the chain is replayed must not read as a cut tail.
        await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    result = Verification(checkpoint=checkpoint)
    expected_seq, prev = 1, GENESIS
    after, keyed_since, anchored = 0, None, None
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
            if record_hash(record, keys.mac) != record.hash:
                result.problem(record.seq, "edited", "content does not match its hash")
            if record.keyed and keyed_since is None:
                keyed_since = record.seq
            elif not record.keyed and keyed_since is not None:
                result.problem(
                    record.seq, "unkeyed", f"not keyed, after keyed records from {keyed_since}"
                )
            if checkpoint is not None and record.seq == checkpoint.seq:
                anchored = record.hash
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
    if checkpoint is not None:
        if expected_seq - 1 < checkpoint.seq:
            result.problem(
                checkpoint.seq,
                "truncated",
                f"the records end at {expected_seq - 1}; a checkpoint signed at {checkpoint.at} "
                f"says the chain reached {checkpoint.seq}",
            )
        elif anchored != checkpoint.hash:
            result.problem(
                checkpoint.seq,
                "rewritten",
                f"differs from the checkpoint signed at {checkpoint.at}",
            )
    return result


# -- checkpoints ------------------------------------------------------------------------------


class Anchor:
    """Signs the chain's head and keeps the checkpoints outside the database: a NATS KV bucket
    (its history is the recent checkpoints) and an append-only file."""

    KEY = "head"

    def __init__(self, keys: AuditKeys, bus: Bus, file: Path | None) -> None:
        self.keys = keys
        self.bus = bus
        self.file = file
        self.bucket = bus.stream("audit_checkpoints")

    async def _kv(self) -> Any:
        from nats.js.errors import BucketNotFoundError

        try:
            return await self.bus.js.key_value(self.bucket)
        except BucketNotFoundError:
            return await self.bus.js.create_key_value(
                bucket=self.bucket, history=64, replicas=self.bus.replicas
            )

    async def latest(self) -> tuple[Checkpoint | None, list[str]]:
        """The latest genuine checkpoint found in any sink, and what looked forged."""
        found: list[Checkpoint] = []
        forged: list[str] = []
        with contextlib.suppress(Exception):  # an unreachable sink: the other still counts
            entry = await (await self._kv()).get(self.KEY)
            if entry.value and (checkpoint := Checkpoint.from_json(entry.value)) is not None:
                found.append(checkpoint)
            elif entry.value:
                forged.append("the KV bucket's checkpoint is unreadable")
        if self.file is not None and self.file.exists():
            lines = self.file.read_bytes().splitlines()
            if lines and (checkpoint := Checkpoint.from_json(lines[-1])) is not None:
                found.append(checkpoint)
            elif lines:
                forged.append(f"the last line of {self.file} is unreadable")
        genuine = []
        for checkpoint in found:
            if self.keys.genuine(checkpoint):
                genuine.append(checkpoint)
            else:
                forged.append(f"a checkpoint at {checkpoint.seq} has a bad signature")
        return max(genuine, key=lambda c: c.seq, default=None), forged

    async def checkpoint(self, session: AsyncSession) -> Checkpoint | None:
        """Sign the current head if it moved on; never a head behind the last checkpoint."""
        head = await repo.audit_head(session)
        if head is None:
            return None
        latest, _ = await self.latest()
        if latest is not None:
            if head.seq == latest.seq and head.hash == latest.hash:
                return None  # nothing new
            # Each checkpoint extends the last: a chain cut or rewritten below it is never
            # signed over (verify reports it; an operator decides).
            anchored = await repo.audit_record(session, latest.seq)
            if head.seq < latest.seq or anchored is None or anchored.hash != latest.hash:
                log.error(
                    "the audit chain no longer extends its last checkpoint; not signing it",
                    extra={"head_seq": head.seq, "checkpoint_seq": latest.seq},
                )
                return None
        checkpoint = self.keys.sign(head.seq, head.hash, utcnow())
        written = 0
        try:
            await (await self._kv()).put(self.KEY, checkpoint.to_json())
            written += 1
        except Exception as exc:
            log.warning("cannot write the audit checkpoint to NATS KV", extra={"error": repr(exc)})
        if self.file is not None:
            try:
                self.file.parent.mkdir(parents=True, exist_ok=True)
                with self.file.open("ab") as f:
                    f.write(checkpoint.to_json() + b"\n")
                written += 1
            except OSError as exc:
                log.warning("cannot append the audit checkpoint", extra={"error": repr(exc)})
        return checkpoint if written else None
