"""Every view in Chromium: labelled controls, keyboard use, and the key lifecycle (shown once,
rotate, revoke)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import expect
from pydantic import SecretStr

from libs.common import apikeys
from libs.common.settings import Settings
from services.authz.app import bootstrap
from tests.approval.support import DEV_SCOPES, catalog_yaml, import_yaml, mcp_server, model, uname
from tests.console.conftest import Stack
from tests.console.support import console_page
from tests.helpers import member_key, new_project


async def test_signing_in_by_keyboard_and_every_view_labels_its_controls(
    browser: Any, stack: Stack, admin_key: str, artifacts: Path
) -> None:
    admin = await console_page(browser, stack.url, artifacts)
    page = admin.page
    await admin.open()
    # The skip link comes first; the key field has the focus; Enter signs in.
    await expect(page.get_by_label("API key")).to_be_focused()
    await page.keyboard.type(admin_key)
    await page.keyboard.press("Enter")
    await page.locator("#who-name").wait_for()
    await expect(page.locator("main h1")).to_be_focused()
    await page.keyboard.press("Shift+Tab")
    assert await admin.unlabelled() == []

    links = await page.locator("#nav a").evaluate_all("(as) => as.map((a) => a.hash)")
    assert len(links) >= 7
    for hash_ in links:
        await admin.go(hash_.removeprefix("#/"))
        await page.wait_for_load_state("networkidle")
        assert await admin.unlabelled() == [], hash_
        # The view's heading takes the focus, for keyboard and screen-reader users.
        await expect(page.locator("main h1")).to_be_focused()
    admin.assert_clean()


async def test_a_platform_key_is_shown_once_then_rotated_and_revoked(
    browser: Any, stack: Stack, admin_key: str, artifacts: Path
) -> None:
    admin = await console_page(browser, stack.url, artifacts)
    page = admin.page
    await admin.sign_in(admin_key)
    await admin.go("keys")
    platform = page.locator("section", has_text="Platform keys")
    await platform.get_by_label("Name", exact=True).fill("ci pipeline")
    await platform.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-key")
    await expect(secret).to_have_value(re.compile(r"^stw_"))
    first = await secret.input_value()
    key_id = first.split("_")[1]
    await expect(page.locator("#secret-title")).to_be_focused()

    await platform.get_by_role("button", name=f"Rotate key ci pipeline ({key_id})").click()
    await page.get_by_role("dialog").get_by_role("button", name="Rotate").click()
    await expect(secret).not_to_have_value(first)
    second = await secret.input_value()
    await expect(platform.get_by_role("row", name=re.compile(key_id))).to_contain_text("→")
    await admin.shot("10-admin-key-rotated")

    new_id = second.split("_")[1]
    await platform.get_by_role("button", name=f"Revoke key ci pipeline ({new_id})").click()
    await page.get_by_role("dialog").get_by_role("button", name="Revoke").click()
    await expect(
        platform.get_by_role("row", name=re.compile(f"^ci pipeline {new_id}"))
    ).to_contain_text("revoked")
    admin.assert_clean()


async def test_the_quick_start_asks_only_what_the_role_may_and_explains_only_its_views(
    browser: Any, stack: Stack, authz: httpx.AsyncClient, admin_key: str, artifacts: Path
) -> None:
    project = await new_project(authz, admin_key, "qs")
    scopes = [*DEV_SCOPES, "inference:invoke", "mcp:invoke"]
    dev_key = await member_key(authz, admin_key, project, "developer", scopes)
    for who, key in (("developer", dev_key), ("admin", admin_key)):
        console = await console_page(browser, stack.url, artifacts)
        page = console.page
        refused: list[str] = []
        page.on(
            "response",
            lambda r, refused=refused: refused.append(r.url) if r.status in (401, 403) else None,
        )
        await console.sign_in(key)
        await console.go("start")
        await page.wait_for_load_state("networkidle")
        await expect(page.locator("#quickstart-steps li")).to_have_count(7)
        assert refused == [], (who, refused)  # no call the role may not make
        guide = await page.locator("#view-guide dt").all_inner_texts()
        opened = await page.locator("#nav a").all_inner_texts()
        assert guide and set(guide) <= set(opened), (who, guide, opened)
        if who == "developer":
            assert "Approvals" not in guide and "Audit trail" not in guide
            # No model is routed in this stack: the snippet says where ids come from.
            await expect(page.locator("#sdk-snippet")).to_contain_text("GET /v1/models")
        await console.shot(f"11-quick-start-{who}")
        console.assert_clean()


async def test_service_keys_are_shown_apart_without_buttons(
    browser: Any, stack: Stack, admin_key: str, artifacts: Path, settings: Settings
) -> None:
    key_id, inference = apikeys.generate()
    await bootstrap(settings.model_copy(update={"inference_api_key": SecretStr(inference)}))
    admin = await console_page(browser, stack.url, artifacts)
    page = admin.page
    await admin.sign_in(admin_key)
    await admin.go("keys")
    apart = page.locator("#pk-service-keys")
    await expect(apart).to_contain_text(key_id)
    await expect(apart.get_by_role("button")).to_have_count(0)
    await expect(page.get_by_role("button", name=f"Revoke key inference ({key_id})")).to_have_count(
        0
    )
    admin.assert_clean()


@pytest.mark.parametrize("width", [1024, 1440])
async def test_every_view_fits_the_window_from_1024_px_up(
    browser: Any, stack: Stack, admin_key: str, artifacts: Path, width: int
) -> None:
    """No view is wider than the window (a clipped catalog table, a pushed-out form): the page
    never scrolls sideways. A screenshot of each view at each width goes to the artefacts."""
    # Something to show: a catalog with long names, the widest thing tables hold.
    long = [model(f"{uname('a-provider-with-a-long-name')}/{'x' * 60}-instruct") for _ in range(3)]
    async with httpx.AsyncClient(base_url=stack.services["catalog"]) as catalog:
        await import_yaml(catalog, admin_key, catalog_yaml(long, [mcp_server(uname("tools"))]))
    admin = await console_page(browser, stack.url, artifacts)
    page = admin.page
    await page.set_viewport_size({"width": width, "height": 900})
    await admin.sign_in(admin_key)
    links = await page.locator("#nav a").evaluate_all("(as) => as.map((a) => a.hash)")
    for hash_ in links:
        view = hash_.removeprefix("#/")
        await admin.go(view)
        await page.wait_for_load_state("networkidle")
        overflow = await page.evaluate(
            "() => ({page: document.documentElement.scrollWidth - window.innerWidth,"
            " main: (() => { const m = document.querySelector('main');"
            " return m.scrollWidth - m.clientWidth; })(),"
            # A table wider than its column hides its last columns behind a scroll bar.
            " tables: [...document.querySelectorAll('main .table-wrap')]"
            "   .map((w) => w.scrollWidth - w.clientWidth).filter((d) => d > 1)})"
        )
        assert overflow["page"] <= 0 and overflow["main"] <= 0, (view, width, overflow)
        assert overflow["tables"] == [], (view, width, overflow)
        await admin.shot(f"layout-{width}-{view}")
    admin.assert_clean()
