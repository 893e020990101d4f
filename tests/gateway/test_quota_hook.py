"""The quota hook: where the metering issue's token quotas will plug in. A gate that refuses turns
into a 429 on /v1 (OpenAI's insufficient_quota) and on Kong routes (Kong's message shape)."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

from gateway.quota import AllowAll, Reservation
from tests.gateway.conftest import RunningGateway, tenant
from tests.gateway.test_kong import kong_yml, post_config
from tests.helpers import bearer


@dataclass
class Refusing:
    """Refuses the named project, records what it was asked and what was settled."""

    project: str
    settled: list[int] = field(default_factory=list)

    def reserve(
        self, *, project: str, credential_id: str, model: str, estimated_tokens: int
    ) -> Reservation:
        allowed = project != self.project
        return Reservation(
            allowed=allowed,
            project=project,
            credential_id=credential_id,
            model=model,
            tokens=estimated_tokens,
            reason="" if allowed else "the project's daily token budget is spent",
            retry_after_seconds=None if allowed else 3600,
        )

    def settle(self, reservation: Reservation, *, used_tokens: int) -> None:
        self.settled.append(used_tokens)


async def test_a_refusing_quota_gate_answers_429_on_v1_and_kong_routes(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, upstream: str
) -> None:
    spent = await tenant(authz, admin_key, gw, ["echo"])
    fine = await tenant(authz, admin_key, gw, ["echo"])
    assert (
        await post_config(
            gw,
            admin_key,
            content=kong_yml(upstream).replace(
                "    - name: key-auth\n      config: {hide_credentials: true}",
                "    - name: key-auth\n      config: {hide_credentials: true}\n"
                "    - name: steward-quota\n      config: {project: kong-team}",
            ),
        )
    ).status_code == 201
    gate = Refusing(spent.project)
    gw.gateway.quota = gate
    body = {"model": "echo", "messages": [{"role": "user", "content": "quota?"}]}
    try:
        async with httpx.AsyncClient(base_url=gw.url) as client:
            refused = await client.post(
                "/v1/chat/completions", json=body, headers=bearer(spent.key)
            )
            assert refused.status_code == 429
            assert refused.json()["error"]["type"] == "insufficient_quota"
            assert refused.headers["retry-after"] == "3600"
            allowed = await client.post("/v1/chat/completions", json=body, headers=bearer(fine.key))
            assert allowed.status_code == 200
            assert gate.settled[-1] == allowed.json()["usage"]["total_tokens"]
            gate.project = "kong-team"
            kong = await client.get("/keyed/x", headers={"apikey": "alice-key"})
            assert kong.status_code == 429
            assert kong.json() == {"message": "Token quota exceeded"}
    finally:
        gw.gateway.quota = AllowAll()
