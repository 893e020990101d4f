"""``steward diff`` / ``steward apply`` against the real services on real sockets."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner, Result

from cli.main import app
from libs.common.settings import Settings
from tests.conftest import running
from tests.helpers import bearer, ok, serve, unique

EXAMPLES = Path(__file__).parents[2] / "examples" / "gitops"


@pytest.fixture(scope="module")
async def service_urls(
    settings: Settings, authz_app: FastAPI, catalog_app: FastAPI, approval_app: FastAPI
) -> AsyncIterator[dict[str, str]]:
    from services.metering.app import create_app

    metering_app = create_app(settings, transports={"authz": httpx.ASGITransport(app=authz_app)})
    async for started in running(metering_app):
        async with (
            serve(authz_app) as authz,
            serve(catalog_app) as catalog,
            serve(approval_app) as approval,
            serve(started) as metering,
        ):
            yield {
                "STEWARD_AUTHZ_URL": authz,
                "STEWARD_CATALOG_URL": catalog,
                "STEWARD_APPROVAL_URL": approval,
                "STEWARD_METERING_URL": metering,
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


def manifests(project: str, model: str, values: dict[str, Any]) -> str:
    """A project with every field GitOps manages, a quota and a price; ``values`` vary them."""
    v = values
    return f"""
apiVersion: steward/v1
kind: Project
metadata: {{name: {project}}}
spec:
  displayName: {v["display"]}
  members:
    - {{subject: alice, role: {v["alice"]}}}
{v["bob"]}
  entitlements:
    - {{kind: model, name: {model}, fallbacks: {json.dumps(v["fallbacks"])}}}
    - {{kind: model, name: {model}-shared}}
---
apiVersion: steward/v1
kind: Quota
metadata: {{name: {project}-monthly}}
spec:
  project: {project}
  window: month
  model: {model}
  limits: {json.dumps(v["limits"])}
  softThreshold: {v["soft"]}
  webhookUrl: {v["webhook"]}
---
apiVersion: steward/v1
kind: Price
metadata: {{name: {model}}}
spec:
  model: {model}
  inputPer1k: "{v["input"]}"
  outputPer1k: "{v["output"]}"
  gpuHour: "{v["gpu"]}"
"""


async def test_every_field_of_a_declared_project_quota_and_price_is_diffed_and_applied(
    service_urls: dict[str, str], authz: httpx.AsyncClient, admin_key: str, tmp_path: Path
) -> None:
    env = {**service_urls, "STEWARD_API_KEY": admin_key}
    project, model = unique("every"), unique("acme/every")
    base: dict[str, Any] = {
        "display": "Every field",
        "alice": "project-admin",
        "bob": "    - {subject: bob, role: developer}",
        "fallbacks": [f"{model}-shared"],
        "limits": {"totalTokens": 1000000, "requests": 5000},
        "soft": 0.8,
        "webhook": "https://hooks.example.com/steward",
        "input": "0.5",
        "output": "1.5",
        "gpu": "2.25",
    }
    (tmp_path / "all.yaml").write_text(manifests(project, model, base))
    first = await steward(env, "apply", "-f", str(tmp_path))
    assert first.exit_code == 0, first.output
    assert (await steward(env, "diff", "-f", str(tmp_path))).exit_code == 0

    metering = service_urls["STEWARD_METERING_URL"]
    changes: list[tuple[dict[str, Any], str]] = [
        ({"display": "Every field, renamed"}, f"project/{project}"),
        ({"alice": "developer"}, f"project/{project}/member/alice"),
        ({"bob": ""}, f"project/{project}/member/bob"),
        ({"fallbacks": []}, f"project/{project}/fallbacks/{model}"),
        ({"limits": {"totalTokens": 2000000, "requests": 5000}}, f"quota/{project}-monthly"),
        ({"limits": {"totalTokens": 2000000, "inputTokens": 10}}, f"quota/{project}-monthly"),
        ({"soft": 0.5}, f"quota/{project}-monthly"),
        ({"webhook": "https://hooks.example.com/other"}, f"quota/{project}-monthly"),
        ({"input": "0.75"}, f"price/{model}"),
        ({"output": "2"}, f"price/{model}"),
        ({"gpu": "3"}, f"price/{model}"),
    ]
    values = dict(base)
    async with httpx.AsyncClient(base_url=metering, headers=bearer(admin_key)) as m:
        for change, target in changes:
            values.update(change)
            (tmp_path / "all.yaml").write_text(manifests(project, model, values))
            drift = await steward(env, "diff", "-f", str(tmp_path), "-o", "json")
            assert drift.exit_code == 1, (change, drift.output)
            assert [c["target"] for c in json.loads(drift.output)] == [target], change
            applied = await steward(env, "apply", "-f", str(tmp_path))
            assert applied.exit_code == 0, applied.output
            assert (await steward(env, "diff", "-f", str(tmp_path))).exit_code == 0, change

        # The live state is the files' last word, field by field.
        live = await ok(await authz.get(f"/v1/projects/{project}", headers=bearer(admin_key)))
        assert live["display_name"] == "Every field, renamed"
        members = await ok(
            await authz.get(f"/v1/projects/{project}/members", headers=bearer(admin_key))
        )
        assert {x["subject"]: x["role"] for x in members} == {"alice": "developer"}
        grants = await ok(
            await authz.get(f"/v1/projects/{project}/entitlements", headers=bearer(admin_key))
        )
        assert {g["asset_name"]: g["fallbacks"] for g in grants}[model] is None
        [quota] = await ok(await m.get("/v1/quotas", params={"project": project}))
        assert quota["limits"] == {
            "input_tokens": 10,
            "output_tokens": None,
            "total_tokens": 2000000,
            "requests": None,
        }
        assert (quota["soft_threshold"], quota["webhook_url"]) == (
            0.5,
            "https://hooks.example.com/other",
        )
        prices = [p for p in await ok(await m.get("/v1/prices", params={"model": model}))]
        current = [p for p in prices if p["effective_until"] is None]
        assert [(p["input_per_1k"], p["output_per_1k"], p["gpu_hour"]) for p in current] == [
            ("0.75", "2", "3")
        ]
