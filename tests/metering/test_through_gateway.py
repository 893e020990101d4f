"""The issue's "done when", through the real gateway: a few hundred calls, then the usage API and
/metrics agree with what the clients were told, to the token."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI
from pydantic import SecretStr

from gateway.tokens import estimate_prompt
from libs.common.events.catalog import VersionState
from libs.common.settings import Settings
from tests.gateway.support import CatalogStub, python_process
from tests.gateway.support import eventually as soon
from tests.helpers import bearer, new_project, ok, serve, snapshot_key, unique
from tests.metering.support import eventually
from tests.metering.test_ingest import metric_sum


@dataclass
class Through:
    url: str
    project: str
    key: str
    gateway: Any


def write_routes(path: Path, upstream: str) -> Path:
    path.write_text(yaml.safe_dump({"models": [{"name": "echo", "upstream": upstream}]}))
    return path


@pytest.fixture(scope="module")
async def through(
    settings: Settings,
    authz_app: FastAPI,
    authz: httpx.AsyncClient,
    admin_key: str,
    metering_app: FastAPI,
    metering: httpx.AsyncClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Through]:
    from gateway.app import ProxyApp
    from gateway.state import Gateway

    upstream = python_process("tests.gateway.upstream")
    await upstream.start()
    stub = CatalogStub()
    stub.versions["echo"] = VersionState(
        asset_id="asset-echo",
        asset_kind="model",
        asset_name="echo",
        version_id="v-echo-1",
        version="1.0",
        status="approved",
    )
    gateway_key = await snapshot_key(authz, admin_key, unique("metering-gw"))
    data_dir = tmp_path_factory.mktemp("metering-gateway")
    routes = write_routes(data_dir / "routes.yaml", f"http://127.0.0.1:{upstream.port}/v1")
    try:
        async with (
            serve(authz_app) as authz_url,
            serve(stub.app()) as catalog_url,
            serve(metering_app) as metering_url,
        ):
            gw_settings = settings.model_copy(
                update={
                    "data_dir": data_dir,
                    "authz_url": authz_url,
                    "catalog_url": catalog_url,
                    "metering_url": metering_url,
                    "gateway_api_key": SecretStr(gateway_key),
                    "gateway_routes_file": routes,
                }
            )
            gateway = await Gateway.start(gw_settings)
            try:
                async with serve(ProxyApp(gateway)) as url:
                    await gateway.wait_loaded(10)
                    project = await new_project(authz, admin_key, "metered")
                    key = await ok(
                        await authz.post(
                            f"/v1/projects/{project}/keys",
                            json={"name": "app", "scopes": ["inference:invoke"]},
                            headers=bearer(admin_key),
                        ),
                        201,
                    )
                    await ok(
                        await authz.put(
                            f"/v1/projects/{project}/entitlements/model/echo",
                            headers=bearer(admin_key),
                        ),
                        201,
                    )
                    await soon(lambda: gateway.auth.key(key["id"]) is not None)
                    await soon(lambda: gateway.auth.entitled(project, "model", "echo"))
                    yield Through(url, project, key["key"], gateway)
            finally:
                await gateway.stop()
    finally:
        await upstream.stop()


async def call(client: httpx.AsyncClient, through: Through, i: int) -> tuple[int, int]:
    """One chat completion (every third one streamed); the usage the client was told."""
    body: dict[str, object] = {
        "model": "echo",
        "messages": [{"role": "user", "content": " ".join(["word"] * (1 + i % 7))}],
    }
    headers = bearer(through.key)
    if i % 3:
        response = await client.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        return usage["prompt_tokens"], usage["completion_tokens"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        usage = {}
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
    return usage["prompt_tokens"], usage["completion_tokens"]


async def test_a_few_hundred_calls_through_the_gateway_are_counted_to_the_token(
    through: Through, metering: httpx.AsyncClient, admin_key: str
) -> None:
    async with httpx.AsyncClient(base_url=through.url, timeout=30) as client:
        told: list[tuple[int, int]] = []
        for start in range(0, 300, 30):
            told += await asyncio.gather(
                *(call(client, through, i) for i in range(start, start + 30))
            )
    prompt = sum(p for p, _ in told)
    completion = sum(c for _, c in told)

    async def counted() -> bool:
        response = await metering.get(
            "/v1/usage", params={"project": through.project}, headers=bearer(admin_key)
        )
        rows = response.json()["rows"]
        return bool(rows and rows[0]["requests"] >= 300)

    await eventually(counted, seconds=20, what="all 300 calls counted")
    body = await ok(
        await metering.get(
            "/v1/usage",
            params={"project": through.project, "group_by": "model"},
            headers=bearer(admin_key),
        )
    )
    [row] = body["rows"]
    assert (row["model"], row["requests"], row["errors"]) == ("echo", 300, 0)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    assert row["ttft_ms"]["count"] == 100  # the streamed calls

    text = (await metering.get("/metrics")).text
    labels = {"project": through.project, "model": "echo"}
    assert metric_sum(text, "gen_ai_client_token_usage", gen_ai_token_type="input", **labels) == (
        prompt
    )
    assert (
        metric_sum(text, "gen_ai_client_token_usage", gen_ai_token_type="output", **labels)
        == completion
    )


async def test_a_small_budget_warns_then_answers_429_at_the_gateway(
    through: Through, metering: httpx.AsyncClient, admin_key: str, authz: httpx.AsyncClient
) -> None:
    """A quota made in metering reaches the gateway's ledger as an event; calls are refused
    once the budget is spent, with RateLimit headers, and the refusals cost no tokens."""
    _, key = await _budget(authz, metering, admin_key, through, 120, prefix="budget")
    body = {
        "model": "echo",
        "messages": [{"role": "user", "content": "count me"}],
        "max_tokens": 16,
    }
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=through.url) as client:
        for _ in range(40):
            response = await client.post("/v1/chat/completions", json=body, headers=bearer(key))
            statuses.append(response.status_code)
            if response.status_code == 429:
                refused = response
                break
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    assert refused.json()["error"]["code"] == "quota_exceeded"
    assert refused.headers["ratelimit-limit"] == "120"
    assert int(refused.headers["retry-after"]) >= 1


async def test_one_gateway_refuses_only_calls_that_would_not_fit_and_never_passes_the_limit(
    through: Through, metering: httpx.AsyncClient, admin_key: str, authz: httpx.AsyncClient
) -> None:
    """Calls of random sizes, one after another, against a 600-token hourly quota, while
    metering counts them and its states reach the gateway at their own pace. Each call is admitted
    iff the tokens used so far plus its reservation (prompt estimate + max_tokens) fit: the
    gateway counts each finished call once, whether metering has counted it yet or not. A
    refusal says to wait for the hour, and repeating the call is refused again."""
    limit = 600
    project, key = await _budget(authz, metering, admin_key, through, limit)
    rng = random.Random(20261203)  # the sizes are random but reproducible
    used = refusals = 0
    async with httpx.AsyncClient(base_url=through.url) as client:
        for i in range(60):
            words = rng.randint(1, 12)
            # The echo upstream answers words + 2 tokens: never more than asked for.
            max_tokens = rng.randint(words + 2, words + 40)
            body = {
                "model": "echo",
                "messages": [{"role": "user", "content": " ".join(["w"] * words)}],
                "max_tokens": max_tokens,
            }
            reservation = estimate_prompt(body) + max_tokens
            response = await client.post("/v1/chat/completions", json=body, headers=bearer(key))
            fits = used + reservation <= limit
            assert response.status_code == (200 if fits else 429), (i, used, reservation)
            if fits:
                usage = response.json()["usage"]
                used += usage["prompt_tokens"] + usage["completion_tokens"]
                continue
            refusals += 1
            retry = int(response.headers["retry-after"])
            assert retry > 1, "nothing is in flight: only the hour's end frees tokens"
            again = await client.post("/v1/chat/completions", json=body, headers=bearer(key))
            assert again.status_code == 429
    assert used <= limit
    assert refusals > 0, "the sizes must reach the limit"
    # Metering's count agrees with the gateway's, call for call.
    await eventually(
        lambda: _quota_used(metering, admin_key, project, used), what="metering's count"
    )


async def _budget(
    authz: httpx.AsyncClient,
    metering: httpx.AsyncClient,
    admin_key: str,
    through: Through,
    limit: int,
    prefix: str = "exact",
) -> tuple[str, str]:
    """A project entitled to echo, its key, and an hourly total-token quota the gateway knows."""
    project = await new_project(authz, admin_key, prefix)
    key = await ok(
        await authz.post(
            f"/v1/projects/{project}/keys",
            json={"name": "app", "scopes": ["inference:invoke"]},
            headers=bearer(admin_key),
        ),
        201,
    )
    await ok(
        await authz.put(
            f"/v1/projects/{project}/entitlements/model/echo", headers=bearer(admin_key)
        ),
        201,
    )
    created = await ok(
        await metering.post(
            f"/v1/projects/{project}/quotas",
            json={"window": "hour", "limits": {"total_tokens": limit}},
            headers=bearer(admin_key),
        ),
        201,
    )
    ledger = through.gateway.quota
    await soon(lambda: any(s.quota_id == created["id"] for s in ledger.states()))
    await soon(lambda: through.gateway.auth.key(key["id"]) is not None)
    await soon(lambda: through.gateway.auth.entitled(project, "model", "echo"))
    return project, str(key["key"])


async def _quota_used(
    metering: httpx.AsyncClient, admin_key: str, project: str, expected: int
) -> bool:
    found = await ok(
        await metering.get("/v1/quotas", params={"project": project}, headers=bearer(admin_key))
    )
    return bool(found and found[0]["input_used"] + found[0]["output_used"] == expected)
