"""The ``external`` runtime: an OpenAI-compatible server Steward does not run (vLLM elsewhere,
Ollama, a hosted API). Provisioning is registration; readiness is a health probe of
``GET {base}/models`` with the upstream credential, opened only for the request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import httpx

from libs.common.events.inference import CredentialError, open_credential
from services.inference.config import InferenceConfig
from services.inference.runtimes.base import EndpointSpec, RuntimeFailure, RuntimeStatus


class ExternalRuntime:
    name = "external"

    def __init__(
        self,
        cfg: InferenceConfig,
        credential_key: bytes,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.cfg = cfg
        self.credential_key = credential_key
        self.http = httpx.AsyncClient(
            timeout=cfg.probe_timeout_seconds, transport=transport, trust_env=False
        )

    def _url(self, spec: EndpointSpec) -> str:
        if not spec.upstream_url:
            raise RuntimeFailure(
                "an external endpoint needs its base URL: register it with "
                "POST /v1/projects/{project}/endpoints and runtime external"
            )
        return spec.upstream_url

    async def provision(self, spec: EndpointSpec) -> None:
        self._url(spec)
        if spec.sealed_credential:
            try:
                open_credential(self.credential_key, spec.sealed_credential)
            except CredentialError as exc:
                raise RuntimeFailure(str(exc)) from exc

    async def status(self, spec: EndpointSpec) -> RuntimeStatus:
        url = self._url(spec)
        headers = {}
        if spec.sealed_credential:
            secret = open_credential(self.credential_key, spec.sealed_credential)
            headers["Authorization"] = f"Bearer {secret}"
        try:
            response = await self.http.get(f"{url}/models", headers=headers)
        except httpx.HTTPError as exc:
            return RuntimeStatus("pending", reason=f"probe of {url}/models failed: {exc!r}")
        if response.status_code == 200:
            return RuntimeStatus("ready", url=url)
        return RuntimeStatus(
            "pending", reason=f"probe of {url}/models answered {response.status_code}"
        )

    async def watch(self, spec: EndpointSpec) -> AsyncGenerator[RuntimeStatus, None]:
        """Probe quickly until ready, then every probe interval; three misses in a row drop it."""
        delay, misses, ready = 0.2, 0, False
        while True:
            status = await self.status(spec)
            if status.state == "ready":
                misses, ready = 0, True
                yield status
            else:
                misses += 1
                if not ready or misses >= 3:
                    ready = False
                    yield status
            wait = self.cfg.probe_interval_seconds if ready else delay
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.cfg.probe_interval_seconds)

    async def scale(self, spec: EndpointSpec, replicas: int) -> None:
        """An external server scales itself; the number is bookkeeping only."""

    async def delete(self, spec: EndpointSpec) -> None:
        """Nothing to remove: Steward only stops routing to it."""

    async def aclose(self) -> None:
        await self.http.aclose()
