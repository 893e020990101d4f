"""Hit-to-run for tools: an MCP server the catalog knows only as a stdio package (server.json
``packages``) is requested as an endpoint with its secret environment, approved, run by the local
runtime behind the bridge, and routed at the gateway for its project alone; deleting it unroutes
it. The secret is sealed from the moment it is filed and reaches only the server's process."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from libs.common.mcp_packages import stdio_package
from services.catalog.importers import PUBLISHER_META
from services.inference.runtimes.base import EndpointSpec, RuntimeFailure
from services.inference.runtimes.kubernetes import interpret_mcp, mcp_manifest
from tests.approval.support import admitted, approve, eventually, file_request, uname
from tests.gateway.test_mcp import ACCEPT, INIT, mcp_client
from tests.helpers import bearer, issue_key, ok
from tests.inference.kube_double import KubeDouble
from tests.inference.support import Team, endpoint_of_request, plan, team, wait_status

SECRET = "tk_s3cret-value-18"


def server_json(name: str) -> dict[str, Any]:
    return {
        "$schema": "https://static.modelcontextprotocol.io/schemas/2025-12-11/server.schema.json",
        "name": name,
        "description": "Tickets, as a PyPI package that speaks stdio",
        "version": "1.0.0",
        "packages": [
            {
                "registryType": "pypi",
                "identifier": "steward-test-tickets",
                "version": "1.0.0",
                "transport": {"type": "stdio"},
                "environmentVariables": [
                    {"name": "TICKETS_TOKEN", "isSecret": True, "isRequired": True},
                    {"name": "TICKETS_REGION", "default": "eu"},
                ],
            }
        ],
        "_meta": {
            PUBLISHER_META: {
                "tools": [
                    {"name": "lookup", "accessType": "read_only"},
                    {"name": "token_seen", "accessType": "read_only"},
                ]
            }
        },
    }


async def admitted_server(
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
    who: Team,
    document: dict[str, Any],
) -> None:
    """The server.json imported, and its version admitted to the catalog on the team's request."""
    await ok(
        await catalog.post("/v1/imports/mcp-servers", json=document, headers=bearer(admin_key))
    )
    name = document["name"]
    await admitted(catalog, approval, admin_key, who.dev, who.project, "mcp_server", name)


def endpoint_request(name: str, environment: dict[str, str] | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "asset_kind": "mcp_server",
        "model_name": name,
        "version": "1.0.0",
        "runtime": "local",
        "plan": plan(gpus=0),
    }
    if environment is not None:
        body["environment"] = environment
    return body


async def discovered(gateway_url: str, key: str, route: str) -> dict[str, Any]:
    """The route as ``GET /mcp/`` lists it to the key, once the key and the route reached the
    gateway (events through NATS)."""

    async def listed() -> dict[str, Any] | None:
        async with httpx.AsyncClient(base_url=gateway_url) as http:
            answer = await http.get("/mcp/", headers=bearer(key))
        if answer.status_code != 200:  # the new key has not reached the gateway yet
            return None
        return next((s for s in answer.json()["data"] if s["name"] == route), None)

    found: dict[str, Any] = await eventually(listed, what=f"the MCP route {route}")
    return found


@pytest.mark.parametrize(
    ("environment", "problem"),
    [
        (None, "the package needs TICKETS_TOKEN"),
        ({"TICKETS_TOKEN": SECRET, "PATH": "/usr/bin"}, "PATH: not an environment variable"),
    ],
)
async def test_an_endpoint_request_with_a_wrong_environment_is_refused_and_files_nothing(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
    environment: dict[str, str] | None,
    problem: str,
) -> None:
    who = await team(authz, admin_key)
    name = f"io.github.steward-test/{uname('tickets')}"
    await admitted_server(catalog, approval, admin_key, who, server_json(name))
    refused = await approval.post(
        f"/v1/projects/{who.project}/requests",
        json={"kind": "endpoint", "payload": endpoint_request(name, environment)},
        headers=bearer(who.dev),
    )
    assert refused.status_code == 422, refused.text
    assert problem in refused.json()["detail"]
    assert SECRET not in refused.text
    listed = await ok(
        await approval.get(
            f"/v1/projects/{who.project}/requests",
            params={"kind": "endpoint"},
            headers=bearer(who.dev),
        )
    )
    assert listed["items"] == []


async def test_a_stdio_package_runs_as_an_endpoint_routed_for_its_project_alone(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
    gateway_url: str,
) -> None:
    who = await team(authz, admin_key)
    name = f"io.github.steward-test/{uname('tickets')}"
    await admitted_server(catalog, approval, admin_key, who, server_json(name))
    access = await file_request(
        approval, who.dev, who.project, "access", {"asset_kind": "mcp_server", "asset_name": name}
    )
    await approve(approval, admin_key, access["id"])

    started = time.monotonic()
    filed = await file_request(
        approval,
        who.dev,
        who.project,
        "endpoint",
        endpoint_request(name, {"TICKETS_TOKEN": SECRET}),
    )
    # What the request keeps and shows: the names, and a sealed value.
    assert filed["payload"]["environment_names"] == ["TICKETS_REGION", "TICKETS_TOKEN"]
    assert filed["payload"]["sealed_environment"]
    assert SECRET not in str(filed)
    decided = await approve(approval, admin_key, filed["id"])
    assert SECRET not in str(decided)
    found = await endpoint_of_request(inference, who.dev, who.project, filed["id"])
    assert (found["asset_kind"], found["route_name"]) == ("mcp_server", f"{who.project}/{name}")
    ready = await wait_status(inference, who.dev, who.project, found["id"], "ready", within=30)
    assert ready["upstream_url"].endswith("/mcp")

    key = str((await issue_key(authz, admin_key, who.project, ["mcp:invoke"]))["key"])
    route = ready["route_name"]

    server = await discovered(gateway_url, key, route)
    print(f"\napproval to a routed MCP server from its package: {time.monotonic() - started:.2f}s")
    assert server["url"] == f"{gateway_url}/mcp/{route}/"
    async with mcp_client(server["url"], key) as client:
        tools = await client.list_tools()
        # The package has three tools; the catalog lists two: the other is never offered.
        assert sorted(t.name for t in tools.tools) == ["lookup", "token_seen"]
        looked = await client.call_tool("lookup", {"ticket": "T-7"})
        seen = await client.call_tool("token_seen", {})
    assert looked.content[0].text.startswith("ticket T-7: open")  # type: ignore[union-attr]
    assert seen.content[0].text == str(len(SECRET))  # type: ignore[union-attr]

    # Another project, even with a key that may call MCP servers, does not see it.
    other = await team(authz, admin_key)
    stranger = str((await issue_key(authz, admin_key, other.project, ["mcp:invoke"]))["key"])
    async with httpx.AsyncClient(base_url=gateway_url) as http:

        async def stranger_known() -> httpx.Response | None:
            listed = await http.get("/mcp/", headers=bearer(stranger))
            return listed if listed.status_code == 200 else None

        listed = await eventually(stranger_known, what="the other project's key at the gateway")
        assert route not in str(listed.json())
        hidden = await http.post(
            f"/mcp/{route}/", json=INIT, headers={**bearer(stranger), **ACCEPT}
        )
        assert hidden.status_code == 404

    await ok(
        await inference.delete(
            f"/v1/projects/{who.project}/endpoints/{found['id']}", headers=bearer(who.admin)
        ),
        202,
    )

    async def unrouted() -> bool:
        async with httpx.AsyncClient(base_url=gateway_url) as http:
            answer = await http.post(f"/mcp/{route}/", json=INIT, headers={**bearer(key), **ACCEPT})
        return answer.status_code == 404

    await eventually(unrouted, what="the route to go")


# -- on Kubernetes: ToolHive's MCPServer --------------------------------------------------------

CRD = Path(__file__).parents[1] / "fixtures" / "toolhive" / "toolhive.stacklok.dev_mcpservers.yaml"


def oci_server_json(name: str) -> dict[str, Any]:
    document = server_json(name)
    document["packages"][0].update(registryType="oci", identifier="ghcr.io/steward-test/tickets")
    return document


def mcp_server_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    schema: dict[str, Any] = served["schema"]["openAPIV3Schema"]
    return schema


def test_the_mcp_server_object_is_valid_against_toolhives_published_crd() -> None:
    package = stdio_package(oci_server_json("io.github.steward-test/tickets"))
    assert package is not None
    spec = EndpointSpec(
        endpoint_id="e1",
        project="team",
        runtime_name="ep-1234",
        asset_name="io.github.steward-test/tickets",
        version="1.0.0",
        source_uri=None,
        served_model_name="tickets",
        replicas=1,
        gpus=0,
        gpu_type=None,
        profile=None,
        owner="alice",
        request_id="r1",
        asset_kind="mcp_server",
        package=package.as_dict(),
    )
    obj = mcp_manifest(spec, "steward-team", ["TICKETS_REGION", "TICKETS_TOKEN"])
    validator = jsonschema.Draft202012Validator(mcp_server_schema())
    validator.validate(obj)
    assert obj["spec"]["image"] == "ghcr.io/steward-test/tickets:1.0.0"
    assert obj["spec"]["secrets"][1] == {
        "name": "ep-1234-env",
        "key": "TICKETS_TOKEN",
        "targetEnvName": "TICKETS_TOKEN",
    }
    # The schema is not vacuous: what ToolHive would refuse, it refuses.
    wrong = {**obj, "spec": {**obj["spec"], "transport": "carrier-pigeon"}}
    assert not validator.is_valid(wrong)
    assert not validator.is_valid({**obj, "spec": {"transport": "stdio"}})  # no image
    # npm and PyPI packages are for the local runtime.
    pypi = stdio_package(server_json("x/y"))
    assert pypi is not None
    with pytest.raises(RuntimeFailure, match="runs from an OCI image"):
        mcp_manifest(dataclasses.replace(spec, package=pypi.as_dict()), "steward-team", [])


def test_toolhive_status_is_read_as_its_operator_writes_it() -> None:
    ready = interpret_mcp({"status": {"phase": "Ready", "url": "http://mcp-x-proxy.ns:8080/mcp"}})
    assert (ready.state, ready.url) == ("ready", "http://mcp-x-proxy.ns:8080/mcp")
    failed = interpret_mcp({"status": {"phase": "Failed", "message": "ImagePullBackOff"}})
    assert (failed.state, failed.reason) == ("failed", "ToolHive reports Failed: ImagePullBackOff")
    assert interpret_mcp({"status": {"phase": "Pending"}}).state == "pending"
    assert interpret_mcp({}).state == "pending"


async def test_on_kubernetes_an_oci_package_becomes_a_toolhive_mcp_server_with_a_secret(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    inference: httpx.AsyncClient,
    admin_key: str,
    gateway_url: str,
    kube: tuple[KubeDouble, str],
) -> None:
    double, _ = kube
    who = await team(authz, admin_key)
    name = f"io.github.steward-test/{uname('oci-tickets')}"
    await admitted_server(catalog, approval, admin_key, who, oci_server_json(name))
    access = await file_request(
        approval, who.dev, who.project, "access", {"asset_kind": "mcp_server", "asset_name": name}
    )
    await approve(approval, admin_key, access["id"])
    body = {**endpoint_request(name, {"TICKETS_TOKEN": SECRET}), "runtime": "kubernetes"}
    filed = await file_request(approval, who.dev, who.project, "endpoint", body)
    await approve(approval, admin_key, filed["id"])
    found = await endpoint_of_request(inference, who.dev, who.project, filed["id"])
    ready = await wait_status(inference, who.dev, who.project, found["id"], "ready", within=30)

    namespace = f"steward-{who.project}"
    # The object's name is the endpoint id's random tail, as for an InferenceService.
    server = double.find("mcpservers", namespace, "ep-" + found["id"].replace("-", "")[-12:])
    assert server is not None
    assert server["spec"]["image"] == "ghcr.io/steward-test/tickets:1.0.0"
    assert server["metadata"]["labels"]["steward.dev/approval-request"] == filed["id"]
    jsonschema.Draft202012Validator(mcp_server_schema()).validate(server)
    [(_, secret_name)] = [k for k in double.secrets if k[0] == namespace]
    assert double.secret_env(namespace, server)["TICKETS_TOKEN"] == SECRET
    assert SECRET not in json.dumps(server)  # the object names the Secret, never the value
    assert ready["upstream_url"] == server["status"]["url"]

    key = str((await issue_key(authz, admin_key, who.project, ["mcp:invoke"]))["key"])
    url = f"{gateway_url}/mcp/{ready['route_name']}/"

    assert (await discovered(gateway_url, key, ready["route_name"]))["url"] == url
    async with mcp_client(url, key) as client:
        seen = await client.call_tool("token_seen", {})
    assert seen.content[0].text == str(len(SECRET))  # type: ignore[union-attr]

    await ok(
        await inference.delete(
            f"/v1/projects/{who.project}/endpoints/{found['id']}", headers=bearer(who.admin)
        ),
        202,
    )

    async def removed() -> bool:
        gone = double.find("mcpservers", namespace, server["metadata"]["name"]) is None
        return gone and (namespace, secret_name) not in double.secrets

    await eventually(removed, what="the MCPServer and its Secret to go")


async def test_a_pypi_package_cannot_be_asked_for_on_kubernetes(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
) -> None:
    who = await team(authz, admin_key)
    name = f"io.github.steward-test/{uname('tickets')}"
    await admitted_server(catalog, approval, admin_key, who, server_json(name))
    body = {**endpoint_request(name, {"TICKETS_TOKEN": SECRET}), "runtime": "kubernetes"}
    refused = await approval.post(
        f"/v1/projects/{who.project}/requests",
        json={"kind": "endpoint", "payload": body},
        headers=bearer(who.dev),
    )
    assert refused.status_code == 422, refused.text
    assert "pypi package: ask for the local runtime" in refused.json()["detail"]
