"""Token quotas at the gateway: the local ledger admits, warns and refuses with Kong's RateLimit
headers — a 429 on /v1 (OpenAI's insufficient_quota) and on Kong routes (Kong's message shape) —
and settles each call's real usage."""

from __future__ import annotations

import httpx

from tests.gateway.conftest import RunningGateway, tenant
from tests.gateway.support import quota
from tests.gateway.test_kong import kong_yml, post_config
from tests.helpers import bearer


async def test_quotas_warn_then_refuse_with_ratelimit_headers_on_v1_and_kong_routes(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, upstream: str
) -> None:
    spent = await tenant(authz, admin_key, gw, ["echo"])
    nearly = await tenant(authz, admin_key, gw, ["echo"])
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
    ledger = gw.gateway.quota
    # The gateway's "now" stands still for the test: its calls fall in the quotas' hour even if
    # the wall clock crosses into the next one meanwhile.
    now, wall_clock = ledger.clock(), ledger.clock
    spent_quota = quota(spent.project, 1000, now, used=1000)
    nearly_quota = quota(nearly.project, 10_000, now)
    kong_quota = quota("kong-team", 500, now, used=500)
    for state in (spent_quota, nearly_quota, kong_quota):
        ledger.apply(state)
    body = {"model": "echo", "messages": [{"role": "user", "content": "quota?"}], "max_tokens": 50}
    ledger.clock = lambda: now
    try:
        async with httpx.AsyncClient(base_url=gw.url) as client:
            refused = await client.post(
                "/v1/chat/completions", json=body, headers=bearer(spent.key)
            )
            assert refused.status_code == 429
            assert refused.json()["error"]["type"] == "insufficient_quota"
            retry = int(refused.headers["retry-after"])
            assert 0 < retry <= 3600
            assert refused.headers["ratelimit-limit"] == "1000"
            assert refused.headers["ratelimit-remaining"] == "0"

            ledger.apply(nearly_quota.model_copy(update={"input_used": 8500, "revision": 1}))
            allowed = await client.post(
                "/v1/chat/completions", json=body, headers=bearer(nearly.key)
            )
            assert allowed.status_code == 200
            assert allowed.headers["ratelimit-limit"] == "10000"
            assert "x-steward-quota-warning" in allowed.headers  # past the 80% threshold
            used = allowed.json()["usage"]
            assert ledger.usage(nearly_quota.quota_id, now)[:2] == (
                8500 + used["prompt_tokens"],
                used["completion_tokens"],
            )

            kong = await client.get("/keyed/x", headers={"apikey": "alice-key"})
            assert kong.status_code == 429
            assert kong.json() == {"message": "Token quota exceeded"}
            assert "retry-after" in kong.headers
    finally:
        for state in (spent_quota, nearly_quota, kong_quota):
            ledger.remove(state.quota_id)
        ledger.clock = wall_clock
