"""No API key, secret half or pepper is ever at rest in the database, in events, or in logs."""

from __future__ import annotations

import io
import logging

import asyncpg
import httpx
import nats
import pytest

from libs.common.observability import JSONFormatter
from libs.common.settings import Settings
from tests.common.support import outbox_relayed, until
from tests.helpers import NATS_URL, bearer, issue_key, new_project, ok


async def everything_in_the_database(database_url: str) -> str:
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn)
    try:
        tables = await conn.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
        dumps: list[str] = []
        for row in tables:
            rows = await conn.fetch(
                f'SELECT row_to_json(t)::text AS j FROM "{row[0]}"."{row[1]}" t'  # noqa: S608
            )
            dumps.extend(r["j"] for r in rows)
        return "\n".join(dumps)
    finally:
        await conn.close()


async def everything_in_the_event_stream(namespace: str) -> str:
    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        stream = f"{namespace}_EVENTS".upper()
        info = await js.stream_info(stream)
        bodies = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except nats.js.errors.NotFoundError:
                continue
            bodies.append((msg.data or b"").decode())
        return "\n".join(bodies)
    finally:
        await nc.close()


async def test_keys_leave_no_plaintext_in_database_events_or_logs(
    authz: httpx.AsyncClient,
    admin_key: str,
    settings: Settings,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    caplog.set_level(logging.DEBUG)
    try:
        project = await new_project(authz, admin_key, "secrets")
        issued = [await issue_key(authz, admin_key, project, ["projects:read"]) for _ in range(3)]
        rotated = await ok(
            await authz.post(
                f"/v1/projects/{project}/keys/{issued[0]['id']}/rotate", headers=bearer(admin_key)
            ),
            201,
        )
        platform = await ok(
            await authz.post(
                "/v1/platform/keys",
                json={"name": "ci", "scopes": ["catalog:read"]},
                headers=bearer(admin_key),
            ),
            201,
        )
        keys = [k["key"] for k in (*issued, rotated, platform)] + [admin_key]
        for key in keys:
            await authz.get("/v1/whoami", headers=bearer(key))
            await authz.get("/v1/whoami", headers=bearer(key[:-1] + "x"))  # failed attempts too
        # What the dumps must cover: every event relayed, and the keys' last use written.
        await outbox_relayed(settings, "authz")
        used = {k["id"] for k in (*issued, rotated, platform)}

        async def last_use_written() -> bool:
            listed = [
                *await ok(
                    await authz.get(f"/v1/projects/{project}/keys", headers=bearer(admin_key))
                ),
                *await ok(await authz.get("/v1/platform/keys", headers=bearer(admin_key))),
            ]
            return used <= {k["id"] for k in listed if k["last_used_at"] is not None}

        await until(last_use_written, what="the last use of every key written")
    finally:
        root.removeHandler(handler)

    secrets = [*keys, *(k.rsplit("_", 1)[1] for k in keys), settings.pepper.decode()]
    database = await everything_in_the_database(database_url)
    events = await everything_in_the_event_stream(settings.event_namespace)
    logs = captured.getvalue() + caplog.text
    assert rotated["id"] in database and rotated["id"] in events  # the dumps are real
    for secret in secrets:
        assert secret not in database
        assert secret not in events
        assert secret not in logs
