"""Helpers shared by the tests: connection settings and short API calls."""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import Any

import httpx
import nats
from nats.js.errors import NotFoundError

PG_ADMIN_DSN = os.environ.get(
    "STEWARD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
NATS_URL = os.environ.get("STEWARD_TEST_NATS_URL", "nats://127.0.0.1:4222")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


async def delete_streams(namespace: str) -> None:
    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        for name in ("EVENTS", "USAGE"):
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(f"{namespace}_{name}".upper())
    finally:
        await nc.close()


async def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    return response.json() if response.content else None


async def new_project(client: httpx.AsyncClient, admin_key: str, prefix: str = "p") -> str:
    name = unique(prefix)
    await ok(await client.post("/v1/projects", json={"name": name}, headers=bearer(admin_key)), 201)
    return name


async def add_member(
    client: httpx.AsyncClient, admin_key: str, project: str, subject: str, role: str
) -> None:
    await ok(
        await client.put(
            f"/v1/projects/{project}/members/{subject}",
            json={"role": role},
            headers=bearer(admin_key),
        )
    )


async def issue_key(
    client: httpx.AsyncClient,
    creator_key: str,
    project: str,
    scopes: list[str],
    *,
    owner: str | None = None,
    role: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"name": unique("key"), "scopes": scopes, **extra}
    if owner:
        body["owner"] = owner
    if role:
        body["role"] = role
    created: dict[str, Any] = await ok(
        await client.post(f"/v1/projects/{project}/keys", json=body, headers=bearer(creator_key)),
        201,
    )
    return created


async def member_key(
    client: httpx.AsyncClient,
    admin_key: str,
    project: str,
    role: str,
    scopes: list[str],
    subject: str | None = None,
) -> str:
    """A member with ``role`` in ``project`` and a key of theirs carrying ``scopes``."""
    subject = subject or unique(role)
    await add_member(client, admin_key, project, subject, role)
    created = await issue_key(client, admin_key, project, scopes, owner=subject)
    return str(created["key"])
