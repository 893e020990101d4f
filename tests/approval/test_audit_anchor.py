"""The audit chain against someone who can write to approval's database: records are keyed with a
secret the database does not hold, and the head is signed into checkpoints kept outside it.

Each attack runs inside a transaction that is rolled back, and the replay reads through that same
transaction: the chain every other test sees is never touched.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.approval import audit
from services.approval import repository as repo
from services.approval.models import AuditRecord
from tests.approval.support import eventually
from tests.helpers import bearer, new_project, ok


@pytest.fixture
def anchor(approval_app: FastAPI) -> audit.Anchor:
    return approval_app.state.audit_anchor  # type: ignore[no-any-return]


async def _checkpointed(
    authz: httpx.AsyncClient, approval_app: FastAPI, anchor: audit.Anchor, admin_key: str
) -> audit.Checkpoint:
    """A fresh record at the head of the chain, and a checkpoint signed over it."""
    project = await new_project(authz, admin_key, "anchored")
    sessions = approval_app.state.ctx.sessionmaker

    async def head_is_recorded() -> bool:
        async with sessions() as session:
            found = await session.scalar(
                select(AuditRecord.seq).where(AuditRecord.target == f"project/{project}")
            )
            return found is not None

    await eventually(head_is_recorded, what="the project's audit record")
    async with sessions() as session:
        checkpoint = await anchor.checkpoint(session)
    assert checkpoint is not None
    return checkpoint


@asynccontextmanager
async def tampering(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """A session on one transaction that holds the chain's head and is always rolled back."""
    async with engine.connect() as conn:
        transaction = await conn.begin()
        try:
            session = AsyncSession(bind=conn)
            await repo.lock_audit_head(session)
            yield session
        finally:
            await transaction.rollback()


async def _forge(
    session: AsyncSession, seq: int, hasher: Callable[[AuditRecord], str], *, keyed: bool = True
) -> None:
    """Make record ``seq`` say someone else did it, and relink every record after it up to the
    head with ``hasher``, as a careful attacker would."""
    records = (
        await session.scalars(
            select(AuditRecord).where(AuditRecord.seq >= seq).order_by(AuditRecord.seq)
        )
    ).all()
    assert records and records[0].seq == seq
    records[0].actor = "mallory"
    prev = records[0].prev_hash
    for record in records:
        record.prev_hash, record.keyed = prev, keyed
        record.hash = prev = hasher(record)
    head = await repo.audit_head(session)
    assert head is not None
    head.hash = prev
    await session.flush()


def _problems(result: audit.Verification) -> set[tuple[int | None, str]]:
    return {(p["seq"], p["problem"]) for p in result.problems}


def _sha256(record: AuditRecord) -> str:
    """What anyone can compute without the key."""
    return hashlib.sha256(repr(sorted(vars(record).items())).encode()).hexdigest()


async def test_an_edit_relinked_without_the_key_is_detected(
    authz: httpx.AsyncClient,
    approval_app: FastAPI,
    anchor: audit.Anchor,
    admin_key: str,
    approval_db: AsyncEngine,
) -> None:
    checkpoint = await _checkpointed(authz, approval_app, anchor, admin_key)
    async with tampering(approval_db) as session:
        await _forge(session, checkpoint.seq, _sha256)
        result = await audit.verify(session, anchor.keys)
        assert result.ok is False
        assert (checkpoint.seq, "edited") in _problems(result)


async def test_downgrading_records_to_plain_sha256_is_detected(
    authz: httpx.AsyncClient,
    approval_app: FastAPI,
    anchor: audit.Anchor,
    admin_key: str,
    approval_db: AsyncEngine,
) -> None:
    """The pre-key form (plain SHA-256) is one anyone can compute: records in it after keyed ones
    are reported even when every hash and link is self-consistent."""
    checkpoint = await _checkpointed(authz, approval_app, anchor, admin_key)
    async with tampering(approval_db) as session:
        await _forge(session, checkpoint.seq, lambda r: audit.record_hash(r, b""), keyed=False)
        problems = _problems(await audit.verify(session, anchor.keys))
        assert (checkpoint.seq, "unkeyed") in problems
        assert not {kind for _, kind in problems} & {"edited", "broken-link"}


async def test_a_cut_tail_is_detected_against_the_checkpoint_and_never_signed_over(
    authz: httpx.AsyncClient,
    approval_app: FastAPI,
    anchor: audit.Anchor,
    admin_key: str,
    approval_db: AsyncEngine,
) -> None:
    checkpoint = await _checkpointed(authz, approval_app, anchor, admin_key)
    async with tampering(approval_db) as session:
        cut = await repo.audit_record(session, checkpoint.seq)
        assert cut is not None
        await session.execute(
            text("DELETE FROM audit_records WHERE seq >= :s"), {"s": checkpoint.seq}
        )
        await session.execute(
            text("UPDATE audit_head SET seq = :s, hash = :h WHERE id = 1"),
            {"s": checkpoint.seq - 1, "h": cut.prev_hash},
        )
        session.expunge_all()
        # Without the checkpoint the shorter chain is a perfectly good chain...
        assert (await audit.verify(session, anchor.keys)).ok is True
        # ...against it, the cut shows, and the cut head is never signed.
        result = await audit.verify(session, anchor.keys, checkpoint)
        assert (checkpoint.seq, "truncated") in _problems(result)
        assert await anchor.checkpoint(session) is None


async def test_a_rewrite_with_the_stolen_key_is_detected_against_the_checkpoint(
    authz: httpx.AsyncClient,
    approval_app: FastAPI,
    anchor: audit.Anchor,
    admin_key: str,
    approval_db: AsyncEngine,
) -> None:
    """With the HMAC key an attacker can rewrite records consistently; what was signed before the
    theft still pins them."""
    checkpoint = await _checkpointed(authz, approval_app, anchor, admin_key)
    async with tampering(approval_db) as session:
        await _forge(session, checkpoint.seq, lambda r: audit.record_hash(r, anchor.keys.mac))
        unanchored = await audit.verify(session, anchor.keys)
        assert unanchored.ok is True, unanchored.problems
        result = await audit.verify(session, anchor.keys, checkpoint)
        assert (checkpoint.seq, "rewritten") in _problems(result)
        assert await anchor.checkpoint(session) is None


async def test_a_forged_checkpoint_is_reported_and_never_trusted(
    authz: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    approval_app: FastAPI,
    anchor: audit.Anchor,
    admin_key: str,
) -> None:
    genuine = await _checkpointed(authz, approval_app, anchor, admin_key)
    assert anchor.file is not None
    published = await ok(await approval.get("/v1/audit/checkpoint", headers=bearer(admin_key)))
    assert published["public_key"] == anchor.keys.public_key
    assert published["checkpoint"]["seq"] >= genuine.seq

    # A checkpoint far ahead would make every honest chain look truncated, if it were believed.
    forged = audit.Checkpoint(seq=genuine.seq + 1000, hash="f" * 64, at=genuine.at, signature="")
    line = forged.to_json() + b"\n"
    with anchor.file.open("ab") as f:
        f.write(line)
    try:
        latest, suspicious = await anchor.latest()
        assert latest is not None and latest.seq < forged.seq
        assert suspicious
        result = await ok(await approval.get("/v1/audit/verify", headers=bearer(admin_key)))
        assert result["ok"] is False
        kinds = {p["problem"] for p in result["problems"]}
        assert kinds == {"forged-checkpoint"}
        assert result["checkpoint"]["seq"] < forged.seq
    finally:
        kept = [x for x in anchor.file.read_bytes().splitlines(keepends=True) if x != line]
        anchor.file.write_bytes(b"".join(kept))
    result = await ok(await approval.get("/v1/audit/verify", headers=bearer(admin_key)))
    assert result["ok"] is True, result["problems"]


async def test_appending_without_the_key_fails_closed(
    approval_app: FastAPI, approval_db: AsyncEngine
) -> None:
    from libs.common.events.audit import AuditRecorded

    event = AuditRecorded(
        service="authz", actor="a", action="x.y", target="x/1", at=datetime.now(UTC)
    )
    async with tampering(approval_db) as session:
        assert audit.KEYS not in session.info
        with pytest.raises(RuntimeError, match="key"):
            await audit.append(session, event, "evt-unkeyed")
