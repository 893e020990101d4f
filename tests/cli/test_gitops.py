"""``steward diff`` / ``steward apply`` against the real services on real sockets."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner, Result

from cli.main import app
from tests.helpers import bearer, ok, serve, unique

EXAMPLES = Path(__file__).parents[2] / "examples" / "gitops"


@pytest.fixture(scope="module")
async def service_urls(
    authz_app: FastAPI, catalog_app: FastAPI, approval_app: FastAPI
) -> AsyncIterator[dict[str, str]]:
    async with (
        serve(authz_app) as authz,
        serve(catalog_app) as catalog,
        serve(approval_app) as approval,
    ):
        yield {
            "STEWARD_AUTHZ_URL": authz,
            "STEWARD_CATALOG_URL": catalog,
            "STEWARD_APPROVAL_URL": approval,
        }


async def steward(env: dict[str, str], *args: str) -> Result:
    """Run the CLI in a thread: the services it calls run on this test's event loop."""
    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke, app, list(args), env={**env, "STEWARD_URL": ""}, catch_exceptions=False
    )


def unique_copy(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The shipped example, with names made unique for this test run."""
    folder = tmp_path / "gitops"
    shutil.copytree(EXAMPLES, folder)
    names = {
        "fraud-detection": unique("fraud"),
        "support-bots": unique("bots"),
        "general-models-access": unique("policy"),
        "granite-3.1-8b-instruct": unique("granite"),
        "io.example/weather": f"io.example/{unique('weather')}",
    }
    for path in folder.rglob("*"):
        if path.is_file():
            text = path.read_text()
            for old, new in names.items():
                text = text.replace(old, new)
            path.write_text(text)
    return folder, names


async def test_apply_twice_changes_nothing_the_second_time_and_diff_gates_on_drift(
    service_urls: dict[str, str], authz: httpx.AsyncClient, admin_key: str, tmp_path: Path
) -> None:
    env = {**service_urls, "STEWARD_API_KEY": admin_key}
    folder, names = unique_copy(tmp_path)

    drift = await steward(env, "diff", "-f", str(folder), "-o", "json")
    assert drift.exit_code == 1, drift.output
    planned = json.loads(drift.output)
    targets = {c["target"] for c in planned}
    assert f"project/{names['fraud-detection']}" in targets
    assert f"project/{names['fraud-detection']}/member/alice" in targets
    assert f"policy/{names['general-models-access']}" in targets
    assert any(t.startswith("catalog/mcp_server/io.example/") for t in targets)

    first = await steward(env, "apply", "-f", str(folder), "-o", "json")
    assert first.exit_code == 0, first.output
    assert len(json.loads(first.output)) == len(planned)
    members = await ok(
        await authz.get(
            f"/v1/projects/{names['fraud-detection']}/members", headers=bearer(admin_key)
        )
    )
    assert {m["subject"]: m["role"] for m in members} == {
        "alice": "project-admin",
        "bob": "developer",
    }

    second = await steward(env, "apply", "-f", str(folder), "-o", "json")
    assert second.exit_code == 0 and json.loads(second.output) == []
    in_sync = await steward(env, "diff", "-f", str(folder))
    assert in_sync.exit_code == 0, in_sync.output

    # Someone adds a member by hand: diff sees the drift, apply removes it.
    project = names["fraud-detection"]
    await ok(
        await authz.put(
            f"/v1/projects/{project}/members/mallory",
            json={"role": "developer"},
            headers=bearer(admin_key),
        )
    )
    drifted = await steward(env, "diff", "-f", str(folder), "-o", "json")
    assert drifted.exit_code == 1
    assert json.loads(drifted.output) == [
        {
            "action": "delete",
            "target": f"project/{project}/member/mallory",
            "detail": "not in the files",
        }
    ]
    assert (await steward(env, "apply", "-f", str(folder))).exit_code == 0
    assert (await steward(env, "diff", "-f", str(folder))).exit_code == 0


async def test_a_manifest_with_a_bad_kind_is_refused_before_any_change(
    service_urls: dict[str, str], admin_key: str, tmp_path: Path
) -> None:
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: steward/v1\nkind: Project\nmetadata: {name: ok-project}\n---\n"
        "apiVersion: steward/v1\nkind: Cluster\nmetadata: {name: x}\n"
    )
    env = {**service_urls, "STEWARD_API_KEY": admin_key}
    with pytest.raises(Exception, match="kind must be one of"):
        await steward(env, "apply", "-f", str(tmp_path))


async def test_a_changed_display_name_and_grant_are_diffed_and_applied(
    service_urls: dict[str, str], authz: httpx.AsyncClient, admin_key: str, tmp_path: Path
) -> None:
    env = {**service_urls, "STEWARD_API_KEY": admin_key}
    folder, names = unique_copy(tmp_path)
    assert (await steward(env, "apply", "-f", str(folder))).exit_code == 0
    project, server = names["fraud-detection"], names["io.example/weather"]
    projects = folder / "projects.yaml"
    projects.write_text(
        projects.read_text().replace(
            "  displayName: Fraud detection\n",
            "  displayName: Fraud & risk\n"
            "  entitlements:\n"
            f"    - {{kind: mcp_server, name: {server}, toolAccess: [read_only]}}\n",
        )
    )
    drift = await steward(env, "diff", "-f", str(folder), "-o", "json")
    assert drift.exit_code == 1, drift.output
    planned = {c["target"]: c for c in json.loads(drift.output)}
    assert planned[f"project/{project}"]["action"] == "update"
    assert "Fraud & risk" in planned[f"project/{project}"]["detail"]
    assert planned[f"project/{project}/entitlement/mcp_server/{server}"]["action"] == "create"
    assert (await steward(env, "apply", "-f", str(folder))).exit_code == 0
    assert (await steward(env, "diff", "-f", str(folder))).exit_code == 0  # nothing left

    live = await ok(await authz.get(f"/v1/projects/{project}", headers=bearer(admin_key)))
    assert live["display_name"] == "Fraud & risk"
    [grant] = await ok(
        await authz.get(f"/v1/projects/{project}/entitlements", headers=bearer(admin_key))
    )
    assert (grant["tool_access"], grant["tools"]) == (["read_only"], None)

    # Widening the grant in the files is a change too.
    projects.write_text(projects.read_text().replace(", toolAccess: [read_only]", ""))
    widened = await steward(env, "diff", "-f", str(folder), "-o", "json")
    [change] = json.loads(widened.output)
    assert change["action"] == "update" and "all tools" in change["detail"]
    assert (await steward(env, "apply", "-f", str(folder))).exit_code == 0
    [grant] = await ok(
        await authz.get(f"/v1/projects/{project}/entitlements", headers=bearer(admin_key))
    )
    assert (grant["tool_access"], grant["tools"]) == (None, None)
