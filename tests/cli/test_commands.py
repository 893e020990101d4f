"""The resource commands of ``steward``, against the real services on real sockets."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from cli.client import CliError
from libs.common import apikeys
from tests.cli.test_gitops import service_urls, steward  # noqa: F401 - the fixture is shared
from tests.helpers import bearer, new_project, unique


async def test_keys_are_created_shown_once_rotated_and_revoked(
    service_urls: dict[str, str],  # noqa: F811
    authz: httpx.AsyncClient,
    admin_key: str,
) -> None:
    env = {**service_urls, "STEWARD_API_KEY": admin_key}
    project = await new_project(authz, admin_key, "cli")
    created = await steward(
        env, "keys", "create", project, "--name", "ci", "--scope", "projects:read", "-o", "json"
    )
    assert created.exit_code == 0, created.output
    key = json.loads(created.output)
    assert (await authz.get("/v1/whoami", headers=bearer(key["key"]))).status_code == 200

    table = await steward(env, "keys", "list", project)
    assert key["id"] in table.output and key["key"] not in table.output

    rotated = await steward(
        env, "keys", "rotate", project, key["id"], "--grace-seconds", "0", "-o", "json"
    )
    new = json.loads(rotated.output)
    revoked = await steward(env, "keys", "revoke", project, new["id"], "-o", "json")
    assert json.loads(revoked.output)["status"] == "revoked"
    assert (await authz.get("/v1/whoami", headers=bearer(new["key"]))).status_code == 401


async def test_audit_verify_exits_zero_on_an_intact_chain(
    service_urls: dict[str, str],  # noqa: F811
    admin_key: str,
) -> None:
    result = await steward(
        {**service_urls, "STEWARD_API_KEY": admin_key}, "audit", "verify", "-o", "json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] is True


async def test_an_imported_model_is_listed_as_draft_and_absent_from_the_dropdown(
    service_urls: dict[str, str],  # noqa: F811
    admin_key: str,
    tmp_path: Path,
) -> None:
    env = {**service_urls, "STEWARD_API_KEY": admin_key}
    name = unique("cli-model")
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        f"source: test\nmodels:\n  - name: {name}\n    version: '1.0'\n"
        f"    artifacts:\n      - uri: hf://org/{name}\n"
    )
    dry = await steward(env, "catalog", "import", str(catalog), "--dry-run", "-o", "json")
    assert json.loads(dry.output)["created"] == 1
    imported = await steward(env, "catalog", "import", str(catalog), "-o", "json")
    assert json.loads(imported.output)["created"] == 1, imported.output
    again = await steward(env, "catalog", "import", str(catalog), "-o", "json")
    assert json.loads(again.output)["unchanged"] == 1

    listed = json.loads((await steward(env, "catalog", "list", "-q", name, "-o", "json")).output)
    assert [(v["name"], v["status"]) for v in listed] == [(name, "draft")]
    dropdown = await steward(
        env, "catalog", "list", "--status", "approved", "-q", name, "-o", "json"
    )
    assert json.loads(dropdown.output) == []


async def test_keygen_prints_a_well_formed_key_each_time_new() -> None:
    first, second = (
        (await steward({}, "keygen")).output.strip(),
        (await steward({}, "keygen")).output.strip(),
    )
    assert apikeys.key_id_of(first) and apikeys.key_id_of(second) and first != second


async def test_the_audit_report_is_written_as_html_or_csv(
    service_urls: dict[str, str],  # noqa: F811
    admin_key: str,
    tmp_path: Path,
) -> None:
    env = {**service_urls, "STEWARD_API_KEY": admin_key}
    today = datetime.now(UTC).date()
    period = ["--from", str(today - timedelta(days=30)), "--to", str(today + timedelta(days=1))]
    page = tmp_path / "audit.html"
    written = await steward(env, "report", "audit", *period, "-o", str(page))
    assert written.exit_code == 0, written.output
    assert "Steward audit report" in page.read_text()
    table = await steward(env, "report", "audit", *period, "--format", "csv")
    assert table.exit_code == 0, table.output
    assert table.output.splitlines()[0].startswith("section,at,actor,action")
    assert table.output.splitlines()[-1].startswith("verification,")
    with pytest.raises(CliError, match="html, csv or json"):
        await steward(env, "report", "audit", *period, "--format", "pdf")
    with pytest.raises(CliError, match="must be after start"):
        await steward(env, "report", "audit", "--from", "2026-02-01", "--to", "2026-01-01")
