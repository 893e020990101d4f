"""The rest of the journey in Chromium: an approved endpoint request becomes a ready endpoint
(inference, local runtime running the simulator), the OpenAI SDK calls it through the gateway,
and the usage charts show the calls (metering, from the gateway's usage events).

Inference and metering run for this module only (module-scoped): their durable consumers must
not compete with the session-wide apps that tests/inference and tests/metering start later.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from playwright.async_api import expect
from pydantic import SecretStr

from libs.common.settings import Settings
from tests.approval.support import catalog_yaml, model, uname
from tests.conftest import running
from tests.console.conftest import CONSOLE, Stack
from tests.console.support import console_page
from tests.helpers import bearer, member_key, new_project, ok, serve

metering_app_module = pytest.importorskip(
    "services.metering.app", reason="the metering service (services/metering) is not there yet"
)
APP_SCOPES = [
    "catalog:read",
    "requests:write",
    "projects:read",
    "endpoints:manage",
    "usage:read",
    "inference:invoke",
]
SIMULATOR_FAST = ["--ttft-ms", "5", "--itl-ms", "1"]


@pytest.fixture(scope="module")
async def full_stack(
    settings: Settings,
    authz_app: FastAPI,
    catalog_app: FastAPI,
    approval_app: FastAPI,
    authz: httpx.AsyncClient,
    admin_key: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    from gateway.app import ProxyApp
    from gateway.state import Gateway
    from services.inference.app import create_app as inference_app
    from services.inference.config import SIMULATOR_COMMAND, InferenceConfig, LocalProfile

    key = await ok(
        await authz.post(
            "/v1/platform/keys",
            json={
                "name": "console-gateway-full",
                "scopes": ["snapshots:read"],
            },
            headers=bearer(admin_key),
        ),
        201,
    )
    config = InferenceConfig(
        local_profiles={
            "simulator": LocalProfile(
                command=[*SIMULATOR_COMMAND, *SIMULATOR_FAST], startup_timeout_seconds=30.0
            )
        },
        reconcile_seconds=0.2,
        health_interval_seconds=0.5,
    )
    in_process = {
        "authz": httpx.ASGITransport(app=authz_app),
        "catalog": httpx.ASGITransport(app=catalog_app),
    }
    inference_settings = settings.model_copy(
        update={"inference_api_key": SecretStr(admin_key), "gpu_pool": {"gpu": 8}}
    )
    async with contextlib.AsyncExitStack() as stack:
        inference = await anext_app(
            stack, inference_app(inference_settings, config=config, transports=in_process)
        )
        metering = await anext_app(
            stack,
            metering_app_module.create_app(
                settings, transports={"authz": httpx.ASGITransport(app=authz_app)}
            ),
        )
        urls = {}
        for name, app in (
            ("authz", authz_app),
            ("catalog", catalog_app),
            ("approval", approval_app),
            ("inference", inference),
            ("metering", metering),
        ):
            urls[name] = await stack.enter_async_context(serve(app))
        gateway_settings = settings.model_copy(
            update={
                "data_dir": tmp_path_factory.mktemp("console-gateway-full"),
                **{f"{name}_url": url for name, url in urls.items()},
                "gateway_api_key": SecretStr(key["key"]),
                "gateway_console_dir": CONSOLE,
            }
        )
        gateway = await Gateway.start(gateway_settings)
        stack.push_async_callback(gateway.stop)
        await gateway.wait_loaded(10)
        url = await stack.enter_async_context(serve(ProxyApp(gateway)))
        yield Stack(url=url, services=urls, settings=gateway_settings)


async def anext_app(stack: contextlib.AsyncExitStack, app: FastAPI) -> FastAPI:
    """Start an app (lifespan, bus ready) and stop it when ``stack`` closes."""
    lifespan = running(app)
    started = await lifespan.__anext__()

    async def stop() -> None:
        with contextlib.suppress(StopAsyncIteration):
            await lifespan.__anext__()

    stack.push_async_callback(stop)
    return started


async def test_an_approved_endpoint_becomes_ready_and_its_calls_show_in_the_usage_charts(
    browser: Any,
    full_stack: Stack,
    authz: httpx.AsyncClient,
    admin_key: str,
    artifacts: Path,
) -> None:
    from openai import AsyncOpenAI, PermissionDeniedError

    # Set up through the API (the browser journey covers these screens): an approved model
    # and a developer of a project entitled to nothing yet.
    prefix = uname("ce")
    model_name = f"{prefix}/chat"
    project = await new_project(authz, admin_key, "ce")
    dev_key = await member_key(
        authz,
        admin_key,
        project,
        "project-admin",
        APP_SCOPES,
    )
    async with httpx.AsyncClient(base_url=full_stack.url + "/api", timeout=20) as api:
        await ok(
            await api.post(
                "/catalog/v1/imports/catalog",
                content=catalog_yaml([model(model_name)]).encode(),
                headers={**bearer(admin_key), "content-type": "application/yaml"},
            )
        )
        asset = await ok(
            await api.post(
                f"/approval/v1/projects/{project}/requests",
                json={
                    "kind": "asset",
                    "payload": {
                        "asset_kind": "model",
                        "asset_name": model_name,
                        "version": "1.0.0",
                    },
                },
                headers=bearer(dev_key),
            ),
            201,
        )
        await ok(
            await api.post(
                f"/approval/v1/requests/{asset['id']}/approve",
                json={"comment": "ok"},
                headers=bearer(admin_key),
            )
        )
        # Entitled to call it (the gateway checks the project's entitlement on every call).
        for _ in range(100):
            access = await api.post(
                f"/approval/v1/projects/{project}/requests",
                json={
                    "kind": "access",
                    "payload": {"asset_kind": "model", "asset_name": model_name},
                },
                headers=bearer(dev_key),
            )
            if access.status_code == 201:  # refused while the approval has not reached catalog
                break
            await asyncio.sleep(0.1)
        await ok(
            await api.post(
                f"/approval/v1/requests/{(await ok(access, 201))['id']}/approve",
                json={"comment": "ok"},
                headers=bearer(admin_key),
            )
        )

    # The developer asks for a local endpoint; the admin approves it in the queue.
    dev = await console_page(browser, full_stack.url, artifacts)
    page = dev.page
    await dev.sign_in(dev_key)
    await dev.reload_until("request", "#endpoint-model", model_name)
    await page.get_by_label("A new inference endpoint").check()
    await page.get_by_label("Model", exact=True).select_option(model_name)
    # The runtime `make run` can serve is the default: nothing to change.
    await expect(page.get_by_label("Runtime")).to_have_value("local")
    await page.get_by_label("GPUs per replica").fill("0")
    await page.get_by_label("Hours needed").fill("2")
    await page.get_by_role("button", name="Submit request").click()
    await expect(page.locator("#request-outcome")).to_contain_text("Request filed: endpoint")

    # The developer watches the (still empty) endpoints view while the admin approves.
    await dev.go("endpoints")
    await expect(page.locator("#endpoint-list")).to_contain_text("No endpoints yet")
    admin = await console_page(browser, full_stack.url, artifacts)
    await admin.sign_in(admin_key)
    await admin.go("queue")
    card = admin.page.locator(".queue-item", has_text=f"endpoint for {model_name}")
    await card.get_by_role("button", name="Approve").click()
    await expect(card).to_have_count(0)

    # Provisioned with no human step: the endpoint appears and turns ready in the open view,
    # with no reload (the view refreshes itself).
    status = page.locator(".endpoint-status").first
    await expect(status).to_have_attribute("data-status", "ready", timeout=60_000)
    route = await page.locator("#endpoint-list code").first.inner_text()
    await dev.shot("11-developer-endpoint-ready")

    # The OpenAI SDK calls it through the gateway with a project key.
    client = AsyncOpenAI(base_url=full_stack.url + "/v1", api_key=dev_key, max_retries=0)
    calls = 0
    for _ in range(100):  # until the gateway's replica has heard of the entitlement
        try:
            reply = await client.chat.completions.create(
                model=route, messages=[{"role": "user", "content": "hello"}]
            )
        except PermissionDeniedError:
            await asyncio.sleep(0.1)
            continue
        assert reply.choices[0].message.content
        calls += 1
        if calls == 3:
            break
    assert calls == 3
    # One streamed answer: the gateway measures its time to first token.
    stream = await client.chat.completions.create(
        model=route, messages=[{"role": "user", "content": "stream"}], stream=True
    )
    async for _ in stream:
        pass
    await client.close()

    # A daily token quota with a soft threshold, for the gauge.
    async with httpx.AsyncClient(base_url=full_stack.url + "/api", timeout=20) as api:
        await ok(
            await api.post(
                f"/metering/v1/projects/{project}/quotas",
                json={"window": "day", "limits": {"total_tokens": 100}, "soft_threshold": 0.5},
                headers=bearer(admin_key),
            ),
            201,
        )

    # The usage charts show the calls.
    await dev.reload_until("usage", "#usage-totals", "Requests")
    requests = page.locator("#usage-totals dd").first
    for _ in range(60):
        if (await requests.inner_text()).strip() == "4":
            break
        await dev.go("usage")
        await page.wait_for_timeout(250)
    await expect(requests).to_have_text("4")
    await expect(page.locator("#quota-gauges figure")).to_have_count(1)
    charts = page.locator("#usage-charts figure")
    await expect(charts).to_have_count(4)
    await expect(charts.nth(2)).to_contain_text(route)
    assert await charts.first.locator("rect").count() > 0
    await expect(charts.nth(3).locator("rect")).to_have_count(2)  # TTFT p50 and p95
    await dev.shot("12-developer-usage-charts")

    # Metering followed the endpoint from inference's events, beside the approved plan.
    await dev.reload_until("endpoints", "#endpoint-costs", route)
    costs = page.locator("#endpoint-costs tr", has_text=route)
    await expect(costs).to_contain_text("within plan")
    await expect(costs).to_contain_text("ready")
    await dev.shot("13-developer-endpoint-costs")
    dev.assert_clean()
    admin.assert_clean()
