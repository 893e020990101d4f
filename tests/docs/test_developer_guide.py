"""docs/developer-guide.md runs as written against the whole stack: the OpenAI SDK example
through the gateway to a project's running endpoint, and the request for an MCP server that runs
from a package. (Its MCP client example runs in tests/gateway/test_docs_mcp.py.)"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import httpx
import pytest

from tests.approval.support import admitted, eventually
from tests.docs.conftest import Stack
from tests.docs.runner import ROOT, block, need, reader_env, run_bash, run_python, substitute
from tests.helpers import bearer, member_key, new_project, ok
from tests.inference.support import wait_status

DOC = "docs/developer-guide.md"


@pytest.fixture(scope="module")
async def examples_admitted(
    stack: Stack, authz: httpx.AsyncClient, catalog: httpx.AsyncClient, approval: httpx.AsyncClient
) -> None:
    """What the platform team did before the guide begins: the example catalog imported, and
    the model and the MCP server the guide uses admitted (asked for by a team, approved)."""
    admin = bearer(stack.admin_key)
    models = (ROOT / "examples/gitops/models.yaml").read_bytes()
    headers = {**admin, "content-type": "application/yaml"}
    await ok(await catalog.post("/v1/imports/catalog", content=models, headers=headers))
    tickets = (ROOT / "examples/gitops/servers/tickets.json").read_bytes()
    headers = {**admin, "content-type": "application/json"}
    await ok(await catalog.post("/v1/imports/mcp-servers", content=tickets, headers=headers))
    team = await new_project(authz, stack.admin_key, "platform")
    scopes = ["catalog:read", "requests:write"]
    dev = await member_key(authz, stack.admin_key, team, "developer", scopes)
    for kind, name, version in (
        ("model", "acme/chat-8b", "1.0"),
        ("mcp_server", "io.github.acme/tickets", "1.0.0"),
    ):
        await admitted(catalog, approval, stack.admin_key, dev, team, kind, name, version)


async def test_the_openai_sdk_example_streams_an_answer_from_the_projects_endpoint(
    stack: Stack,
    examples_admitted: None,
    authz: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    project = await new_project(authz, stack.admin_key, "fraud-detection")
    admin = bearer(stack.admin_key)
    grant = f"/v1/projects/{project}/entitlements/model/acme/chat-8b"
    await ok(await authz.put(grant, headers=admin), 201)
    key = await member_key(authz, stack.admin_key, project, "developer", ["inference:invoke"])
    endpoint = await ok(
        await inference.post(
            f"/v1/projects/{project}/endpoints",
            json={"model_name": "acme/chat-8b", "version": "1.0", "runtime": "local"},
            headers=admin,
        ),
        201,
    )
    await wait_status(inference, stack.admin_key, project, endpoint["id"], "ready")
    route = f"{project}/acme/chat-8b"
    gateway = stack.urls["gateway"]

    async def routed() -> bool:
        async with httpx.AsyncClient(headers=bearer(key)) as http:
            models = await ok(await http.get(f"{gateway}/v1/models"))
        return [m["id"] for m in models["data"]] == [route]

    await eventually(routed, what="the gateway to route the project's endpoint")
    code = substitute(
        block(DOC, "## Calling a model with the OpenAI SDK"),
        {"https://steward.example.com": gateway, '"stw_..."': f'"{key}"'},
    )
    ran = await run_python(code.replace("fraud-detection", project), reader_env(tmp_path))
    listed, answer = ran.ok().splitlines()
    assert listed == str([route])  # exactly what the project may use
    assert len(answer.split()) >= 4  # the simulator's words, streamed


async def test_an_mcp_server_from_a_package_is_requested_with_its_secret_sealed(
    stack: Stack, examples_admitted: None, authz: httpx.AsyncClient, tmp_path: Path
) -> None:
    need("curl")
    project = await new_project(authz, stack.admin_key, "fraud-detection")
    scopes = ["catalog:read", "requests:write"]  # as the guide says
    key = await member_key(authz, stack.admin_key, project, "developer", scopes)
    secret = "tickets-" + secrets.token_hex(8)
    # The reader's project and their server's token.
    code = substitute(block(DOC, "## MCP servers", 1), {"fraud-detection": project, "…": secret})
    env = reader_env(tmp_path, STEWARD_GATEWAY_URL=stack.urls["gateway"], STEWARD_API_KEY=key)
    out = (await run_bash(code, env)).ok()
    filed = json.loads(out)
    assert (filed["kind"], filed["status"], filed["project"]) == ("endpoint", "pending", project)
    assert filed["payload"]["asset_kind"] == "mcp_server"
    assert filed["payload"]["environment_names"] == ["TICKETS_TOKEN"]  # the reviewer sees this
    assert secret not in out  # and never the value
