"""Typed HTTP clients for service-to-service calls, and the principal resolver built on authz.

Each client owns one long-lived ``httpx.AsyncClient`` (created in the lifespan, closed at
shutdown). Idempotent calls are retried with backoff; the caller's credential is forwarded, so a
service never holds more power than the request it serves.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
from opentelemetry import propagate

from libs.common.auth import Decision, Principal
from libs.common.errors import Forbidden, ServiceUnavailable, Unauthorized
from libs.common.observability import request_id_var


class ServiceClient:
    service: ClassVar[str] = ""

    def __init__(
        self,
        base_url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 5.0,
        retries: int = 2,
    ) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, transport=transport, timeout=timeout)
        self.retries = retries

    async def request(
        self, method: str, path: str, *, credential: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers: dict[str, str] = dict(kwargs.pop("headers", {}))
        if credential:
            headers["Authorization"] = f"Bearer {credential}"
        if rid := request_id_var.get():
            headers["X-Request-Id"] = rid
        # The caller's trace continues in the service called (nothing without a tracer provider).
        propagate.inject(headers)
        idempotent = method in {"GET", "HEAD", "PUT", "DELETE"} or kwargs.pop("idempotent", False)
        attempts = 1 + (self.retries if idempotent else 0)
        for attempt in range(attempts):
            try:
                response = await self.http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                if attempt + 1 == attempts:
                    raise ServiceUnavailable(f"{self.service} is unreachable") from exc
            else:
                if response.status_code < 500 or attempt + 1 == attempts:
                    return response
            await asyncio.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self.http.aclose()


class AuthzClient(ServiceClient):
    service = "authz"

    async def whoami(self, credential: str) -> Principal:
        response = await self.request("GET", "/v1/whoami", credential=credential)
        if response.status_code == 401:
            raise Unauthorized(response.json().get("detail", "invalid credential"))
        if response.status_code != 200:
            raise ServiceUnavailable(f"authz answered {response.status_code}")
        return Principal.from_dict(response.json())

    async def authorize(self, credential: str, action: str, project: str | None) -> Decision:
        response = await self.request(
            "POST",
            "/v1/authorize",
            credential=credential,
            json={"action": action, "project": project},
            idempotent=True,
        )
        if response.status_code == 401:
            raise Unauthorized(response.json().get("detail", "invalid credential"))
        if response.status_code != 200:
            raise ServiceUnavailable(f"authz answered {response.status_code}")
        body = response.json()
        return Decision(allowed=body["allowed"], reason=body["reason"])


class CatalogClient(ServiceClient):
    """What other services ask the catalog, on behalf of (and with the credential of) a caller."""

    service = "catalog"

    async def asset(self, credential: str, kind: str, name: str) -> dict[str, Any] | None:
        """The asset with all its versions, or None when the catalog has no such asset."""
        response = await self.request(
            "GET", f"/v1/assets/{kind}/{quote(name, safe='/')}", credential=credential
        )
        if response.status_code == 404:
            return None
        if response.status_code == 401:
            raise Unauthorized(response.json().get("detail", "invalid credential"))
        if response.status_code == 403:
            detail = response.json().get("detail", "forbidden")
            raise Forbidden(f"reading the catalog was refused: {detail}")
        if response.status_code != 200:
            raise ServiceUnavailable(f"catalog answered {response.status_code}")
        body: dict[str, Any] = response.json()
        return body


class RemoteResolver:
    """Resolves credentials through authz, caching each answer briefly.

    The cache is keyed by a hash of the credential (never the credential itself) and lives
    ``ttl`` seconds: a revoked key stops working at a service within that time.
    """

    def __init__(self, client: AuthzClient, *, ttl: float = 2.0, size: int = 10_000) -> None:
        self.client = client
        self.ttl = ttl
        self.size = size
        self._cache: OrderedDict[bytes, tuple[float, Principal]] = OrderedDict()

    async def resolve(self, credential: str) -> Principal:
        key = hashlib.sha256(credential.encode()).digest()
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        principal = await self.client.whoami(credential)
        self._cache[key] = (now + self.ttl, principal)
        self._cache.move_to_end(key)
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return principal
