"""The console in a real browser (Debian's Chromium), against the real services and gateway:
a platform admin and a developer take a model from an imported catalog to an entitlement."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from playwright.async_api import expect

from tests.approval.support import catalog_yaml, mcp_server, model, uname
from tests.console.conftest import Stack
from tests.console.support import console_page

ADMIN_VIEWS = ("queue", "audit", "projects")
DEV_SCOPES = [
    "catalog:read",
    "requests:write",
    "projects:read",
    "keys:manage",
    "usage:read",
    "endpoints:manage",
    "inference:invoke",
]


async def test_admin_and_developer_take_a_model_from_import_to_entitlement(
    browser: Any, stack: Stack, admin_key: str, artifacts: Path, tmp_path: Path
) -> None:
    prefix = uname("cj")
    project, developer = f"{prefix}-team", f"{prefix}-dev"
    model_name, server_name = f"{prefix}/chat-8b", f"{prefix}-tools"

    # -- the admin signs in: the first-run quick start, every admin view in the navigation.
    admin = await console_page(browser, stack.url, artifacts)
    page = admin.page
    await admin.sign_in(admin_key)
    await expect(page.locator("#quickstart-steps li")).to_have_count(7)
    for view in ADMIN_VIEWS:
        await expect(page.locator(f'#nav a[href="#/{view}"]')).to_have_count(1)
    await admin.shot("01-admin-quick-start")

    # -- a project, a developer in it, and the developer's key (shown once, with a copy button).
    await admin.go("projects")
    await page.get_by_label("Name", exact=True).fill(project)
    await page.get_by_role("button", name="Create project").click()
    await expect(page.locator("#project-select")).to_have_value(project)
    await admin.go("project")
    await page.get_by_label("Member (user name or OIDC subject)").fill(developer)
    await page.get_by_role("button", name="Add or change member").click()
    await expect(page.get_by_role("cell", name=developer, exact=True)).to_be_visible()
    await admin.go("keys")
    await page.get_by_label("Name", exact=True).first.fill("developer console key")
    await page.get_by_label("Issue to member").fill(developer)
    for scope in DEV_SCOPES:
        await page.get_by_label(scope, exact=True).first.check()
    await page.get_by_role("button", name="Create key").first.click()
    secret = page.locator("#new-key")
    await expect(secret).to_have_value(re.compile(r"^stw_[0-9A-Za-z]{8}_[0-9A-Za-z]{32}$"))
    dev_key = await secret.input_value()
    await expect(page.get_by_role("button", name="Copy")).to_be_visible()
    await admin.shot("02-admin-key-shown-once")
    await page.get_by_role("button", name="I have stored it — hide").click()
    await expect(secret).to_have_count(0)
    await admin.go("start")
    await admin.go("keys")
    assert dev_key not in await page.content(), "a key is shown once only"

    # -- the admin imports a catalog: a model and an MCP server, as drafts.
    await admin.go("catalog")
    await page.get_by_text("Import a catalog file or MCP server.json").click()
    text = catalog_yaml([model(model_name)], [mcp_server(server_name)])
    await page.get_by_label("Content").fill(text)
    await page.get_by_role("button", name="Import", exact=True).click()
    await expect(page.locator("#import-result")).to_contain_text("created 2")
    await admin.shot("03-admin-catalog-imported")

    # -- the developer signs in: no admin views; asks for the model to be admitted.
    dev = await console_page(browser, stack.url, artifacts)
    dpage = dev.page
    await dev.sign_in(dev_key)
    await expect(dpage.locator("#who-name")).to_have_text(developer)
    for view in ADMIN_VIEWS:
        await expect(dpage.locator(f'#nav a[href="#/{view}"]')).to_have_count(0)
    await dev.go("catalog")
    await dpage.get_by_label("Search").fill(prefix)
    await dpage.get_by_role("button", name="Filter").click()
    await dpage.get_by_role("button", name=server_name).click()
    details = dpage.locator("#version-details")
    await expect(details).to_contain_text("write_note")
    await expect(details).to_contain_text("read write")
    await dpage.get_by_role("button", name=model_name).click()
    await expect(details).to_contain_text("sha256:")
    await expect(details.get_by_role("link", name="licence text")).to_have_attribute(
        "href", "https://www.apache.org/licenses/LICENSE-2.0.txt"
    )
    await expect(details.get_by_role("button", name="Revoke")).to_have_count(0)
    await dev.shot("04-developer-catalog-details")
    await details.get_by_role("button", name="Request admission to the catalog").click()
    await expect(dpage.locator("#toasts")).to_contain_text("Admission of")

    # -- the admin approves the asset request in the queue.
    await admin.go("queue")
    card = page.locator(".queue-item", has_text=model_name)
    await expect(card).to_contain_text("provenance")
    await expect(card.locator(".sla")).to_contain_text("left")
    await card.get_by_role("button", name="Approve").click()
    await expect(page.locator(".queue-item", has_text=model_name)).to_have_count(0)

    # -- the model reaches the dropdown; the developer requests access and an endpoint.
    await dev.reload_until("request", "#access-asset", model_name)
    await dpage.get_by_label("Asset").select_option(f"model|{model_name}")
    await dpage.get_by_label("Justification").first.fill("fraud triage assistant")
    await dpage.get_by_role("button", name="Submit request").click()
    await expect(dpage.locator("#request-outcome")).to_contain_text("Request filed: access")

    await dpage.get_by_label("A new inference endpoint").check()
    await dpage.get_by_label("Model", exact=True).select_option(model_name)
    await dpage.get_by_label("GPUs per replica").fill("2")
    await dpage.get_by_label("Replicas").fill("3")
    await dpage.get_by_label("Hours needed").fill("10")
    await dpage.get_by_label("GPU-hour rate").fill("2.5")
    # The estimate follows the typing: 2 x 3 x 10 = 60 GPU-hours, x 2.5 = 150.
    await expect(dpage.locator("#cost-estimate")).to_have_text(re.compile(r"150\.00"))
    await expect(dpage.locator("#cost-formula")).to_contain_text("60 GPU-hours")
    # The server's field errors land next to their fields.
    await dpage.get_by_label("Hours needed").fill("0")
    await dpage.get_by_role("button", name="Submit request").click()
    hours_error = dpage.locator("#plan-hours-error")
    await expect(hours_error).to_be_visible()
    await expect(dpage.get_by_label("Hours needed")).to_have_attribute("aria-invalid", "true")
    await dev.shot("05-developer-endpoint-field-error")
    await dpage.get_by_label("Hours needed").fill("10")
    await dpage.get_by_role("button", name="Submit request").click()
    await expect(dpage.locator("#request-outcome")).to_contain_text("Request filed: endpoint")
    await dev.shot("06-developer-requests")

    # -- the queue: the plan and its cost; a rejection needs a comment; access is approved.
    await admin.go("queue")
    endpoint_card = page.locator(".queue-item", has_text=f"endpoint for {model_name}")
    await expect(endpoint_card).to_contain_text("150.00")
    await admin.shot("07-admin-queue")
    await endpoint_card.get_by_role("button", name="Reject").click()
    await expect(endpoint_card.locator(".field-error")).to_contain_text("Say why")
    await endpoint_card.get_by_label("Comment").fill("three replicas are more than a pilot needs")
    await endpoint_card.get_by_role("button", name="Reject").click()
    access_card = page.locator(".queue-item", has_text=f"access to model {model_name}")
    await access_card.get_by_role("button", name="Approve").click()
    await expect(page.locator("#queue-count")).to_be_visible()
    await expect(page.locator(".queue-item", has_text=prefix)).to_have_count(0)

    # -- the developer sees the entitlement (granted by authz on the approval event).
    await dev.reload_until("project", "#entitlements", model_name)
    await dev.shot("08-developer-entitlement")

    # -- the audit trail: the chain verifies (green).
    await admin.go("audit")
    verdict = page.locator("#audit-verify .audit-verify")
    await expect(verdict).to_have_attribute("data-ok", "true")
    await expect(verdict).to_contain_text("Chain verified")
    await admin.shot("09-admin-audit-verified")
    # The audit report of the last 30 days, downloaded as an auditor takes it away.
    async with page.expect_download() as downloading:
        await page.get_by_role("button", name="Download HTML").click()
    download = await downloading.value
    saved = tmp_path / "audit-report.html"
    await download.save_as(saved)
    report = saved.read_text()
    assert "Steward audit report" in report and "Verified: no record edited" in report
    assert model_name in report  # its admission is among the approvals
    await expect(page.locator("#report-status")).to_contain_text("Downloaded the HTML report")

    # -- every view labels its controls; nothing went to localStorage; sign-out forgets the key.
    for console in (admin, dev):
        assert await console.page.evaluate("() => window.localStorage.length") == 0
        console.assert_clean()
    await dpage.get_by_role("button", name="Sign out").click()
    await expect(dpage.get_by_label("API key")).to_be_visible()
    assert await dpage.evaluate("() => window.sessionStorage.length") == 0
