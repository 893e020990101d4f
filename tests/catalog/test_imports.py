"""Imports accept and refuse the published formats as their owners do, and never half import."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from libs.common.events.catalog import VersionState
from services.catalog import domain
from services.catalog.models import Asset, Version
from tests.approval.support import asset, catalog_yaml, import_yaml, mcp_server, model, uname
from tests.helpers import bearer, ok

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
KUBEFLOW = FIXTURES / "kubeflow-catalog"
MCP = FIXTURES / "mcp-registry"


def _yaml_headers(key: str) -> dict[str, str]:
    return {**bearer(key), "content-type": "application/yaml"}


async def _post_yaml(catalog: httpx.AsyncClient, key: str, text: str) -> httpx.Response:
    return await catalog.post(
        "/v1/imports/catalog", content=text.encode(), headers=_yaml_headers(key)
    )


async def test_kubeflow_validated_models_import_as_drafts_and_a_second_import_changes_nothing(
    catalog: httpx.AsyncClient, admin_key: str
) -> None:
    text = (KUBEFLOW / "dev-validated-models.yaml").read_text()
    first = await import_yaml(catalog, admin_key, text)
    assert first["created"] + first["unchanged"] == 5
    second = await import_yaml(catalog, admin_key, text)
    assert (second["created"], second["updated"], second["unchanged"]) == (0, 0, 5)
    assert [v["version_id"] for v in second["versions"]] == [
        v["version_id"] for v in first["versions"]
    ]

    found = await asset(catalog, admin_key, "model", "certified/production-llm-8b")
    assert found is not None
    [version] = found["versions"]
    assert version["status"] == "draft"
    assert version["version"] == "validated-v1.0"  # the artifact's OCI tag
    assert version["provider"] == "Validation Authority"
    spec = version["spec"]
    assert (
        spec["source_uri"]
        == "oci://registry.example.com/certified/production-llm-8b:validated-v1.0"
    )
    assert spec["license"] == "apache-2.0"
    assert spec["license_link"] == "https://www.apache.org/licenses/LICENSE-2.0.txt"
    assert spec["tasks"] == ["text-generation", "question-answering", "summarization"]
    checks = {c["check"]: c["ok"] for c in version["checklist"]}
    assert checks == {"provenance": True, "digest": False, "license": True, "license_link": True}


async def test_kubeflow_test_catalog_and_mcp_servers_import(
    catalog: httpx.AsyncClient, admin_key: str
) -> None:
    models = await import_yaml(catalog, admin_key, (KUBEFLOW / "test-catalog.yaml").read_text())
    assert models["created"] + models["unchanged"] == 9
    servers = await import_yaml(
        catalog, admin_key, (KUBEFLOW / "test-mcp-servers.yaml").read_text()
    )
    assert servers["created"] + servers["unchanged"] == 6

    calculator = await asset(catalog, admin_key, "mcp_server", "calculator")
    assert calculator is not None
    tools = calculator["versions"][0]["tools"]
    # The source vouches that every tool is read-only.
    assert tools == [
        {"name": "calculate", "access": "read_only"},
        {"name": "solve_equation", "access": "read_only"},
    ]
    weather = await asset(catalog, admin_key, "mcp_server", "weather-api")
    assert weather is not None
    [version] = weather["versions"]
    assert version["tags"] == ["api", "community", "weather"]
    # Without an access type a tool is assumed to do anything.
    assert {t["access"] for t in version["tools"]} == {"execute"}


async def test_a_sources_file_is_not_a_catalog_and_is_refused(
    catalog: httpx.AsyncClient, admin_key: str
) -> None:
    response = await _post_yaml(catalog, admin_key, (KUBEFLOW / "sources.yaml").read_text())
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert "models[] and/or mcp_servers[]" in response.json()["detail"]


@pytest.mark.parametrize("name", ["minimal", "with-package", "with-remote"])
async def test_valid_registry_server_json_imports(
    catalog: httpx.AsyncClient, admin_key: str, name: str
) -> None:
    document = json.loads((MCP / "valid" / f"{name}.json").read_text())
    result = await ok(
        await catalog.post("/v1/imports/mcp-servers", json=document, headers=bearer(admin_key))
    )
    assert result["created"] + result["unchanged"] == 1
    again = await ok(
        await catalog.post("/v1/imports/mcp-servers", json=document, headers=bearer(admin_key))
    )
    assert again["unchanged"] == 1
    found = await asset(catalog, admin_key, "mcp_server", document["name"])
    assert found is not None
    assert found["versions"][0]["version"] == document["version"]
    assert found["versions"][0]["spec"]["server"] == document


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("bad-name-pattern", "name"),
        ("description-too-long", "description"),
        ("missing-name", "name"),
        ("package-version-latest", "packages[0].version"),
    ],
)
async def test_invalid_registry_server_json_is_refused_naming_the_field(
    catalog: httpx.AsyncClient, admin_key: str, name: str, field: str
) -> None:
    document = json.loads((MCP / "invalid" / f"{name}.json").read_text())
    response = await catalog.post(
        "/v1/imports/mcp-servers", json=document, headers=bearer(admin_key)
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert [e["field"] for e in body["errors"]] == [field]
    assert field in body["detail"]
    if "name" in document:
        assert await asset(catalog, admin_key, "mcp_server", document["name"]) is None


async def test_a_folder_with_one_invalid_server_json_imports_nothing(
    catalog: httpx.AsyncClient, admin_key: str
) -> None:
    good = json.loads((MCP / "valid" / "minimal.json").read_text())
    good["name"] = f"io.github.{uname('steward')}/weather"
    bad = json.loads((MCP / "invalid" / "package-version-latest.json").read_text())
    response = await catalog.post(
        "/v1/imports/mcp-servers", json=[good, bad], headers=bearer(admin_key)
    )
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == ["[1].packages[0].version"]
    assert await asset(catalog, admin_key, "mcp_server", good["name"]) is None


async def test_a_catalog_file_with_one_bad_entry_imports_nothing(
    catalog: httpx.AsyncClient, admin_key: str
) -> None:
    prefix = uname("partial")
    bad = model(f"{prefix}/bad", artifacts=[{"uri": "http://example.com/model.bin"}])
    text = catalog_yaml([model(f"{prefix}/good-1"), model(f"{prefix}/good-2"), bad])
    response = await _post_yaml(catalog, admin_key, text)
    assert response.status_code == 422
    [error] = response.json()["errors"]
    assert error["field"] == "models[2].artifacts[0].uri"
    assert "scheme 'http' is not allowed" in error["message"]
    for name in (f"{prefix}/good-1", f"{prefix}/good-2", f"{prefix}/bad"):
        assert await asset(catalog, admin_key, "model", name) is None


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"description": "no name"}, "models[0].name"),
        ({"name": "has spaces"}, "models[0].name"),
        ({"name": "m", "version": "latest"}, "models[0].version"),
        ({"name": "m", "version": "^1.2"}, "models[0].version"),
        ({"name": "m", "digest": "md5:abc"}, "models[0].digest"),
        ({"name": "m", "artifacts": [{"name": "no-uri"}]}, "models[0].artifacts[0]"),
        ({"name": "m", "serving": {"gpus": -1}}, "models[0].serving.gpus"),
        (
            {"name": "m", "serving": {"tokenizer": "https://x/t.json"}},
            "models[0].serving.tokenizer",
        ),
        ({"name": "m", "serving": {"tokenizer": "file://t.json"}}, "models[0].serving.tokenizer"),
        ({"name": "m", "serving": {"tokenizer": "file:///t.bin"}}, "models[0].serving.tokenizer"),
        ({"name": "m", "createTimeSinceEpoch": "yesterday"}, "models[0].createTimeSinceEpoch"),
    ],
)
async def test_bad_model_entries_are_refused_with_the_field_path(
    catalog: httpx.AsyncClient, admin_key: str, entry: dict[str, object], field: str
) -> None:
    response = await _post_yaml(catalog, admin_key, yaml.safe_dump({"models": [entry]}))
    assert response.status_code == 422
    assert field in [e["field"] for e in response.json()["errors"]]


async def test_the_same_version_twice_in_one_file_is_refused(
    catalog: httpx.AsyncClient, admin_key: str
) -> None:
    name = uname("twice")
    response = await _post_yaml(catalog, admin_key, catalog_yaml([model(name), model(name)]))
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "models[1].name"


async def test_malformed_yaml_and_json_get_a_4xx_naming_the_line(
    catalog: httpx.AsyncClient, admin_key: str
) -> None:
    response = await _post_yaml(catalog, admin_key, "models:\n  - name: [unclosed\n")
    assert response.status_code == 422
    assert "line" in response.json()["detail"]
    response = await _post_yaml(catalog, admin_key, "- just\n- a list\n")
    assert response.status_code == 422
    response = await catalog.post(
        "/v1/imports/mcp-servers",
        content=b"{not json",
        headers={**bearer(admin_key), "content-type": "application/json"},
    )
    assert response.status_code == 422
    response = await _post_yaml(catalog, admin_key, "")
    assert response.status_code == 400


async def test_a_draft_is_replaced_by_a_changed_import_and_keeps_its_id(
    catalog: httpx.AsyncClient, admin_key: str
) -> None:
    name = uname("draft")
    first = await import_yaml(catalog, admin_key, catalog_yaml([model(name)]))
    changed = await import_yaml(
        catalog, admin_key, catalog_yaml([model(name, description="better words")])
    )
    assert changed["updated"] == 1
    assert changed["versions"][0]["version_id"] == first["versions"][0]["version_id"]
    found = await asset(catalog, admin_key, "model", name)
    assert found is not None and found["versions"][0]["description"] == "better words"


async def test_serving_hints_tags_and_mcp_extensions_are_kept(
    catalog: httpx.AsyncClient, admin_key: str
) -> None:
    name, server = uname("served"), uname("srv")
    text = catalog_yaml(
        [
            model(
                name,
                tags=["General", "chat"],
                serving={"runtime": "vllm", "gpus": 2, "contextLength": 32768},
                artifacts=[{"uri": f"hf://acme/{name}"}],
                digest="sha256:" + "b" * 64,
            )
        ],
        [mcp_server(server)],
    )
    await import_yaml(catalog, admin_key, text)
    found = await asset(catalog, admin_key, "model", name)
    assert found is not None
    [version] = found["versions"]
    assert version["tags"] == ["chat", "general"]
    assert version["spec"]["serving"] == {"runtime": "vllm", "gpus": 2, "context_length": 32768}
    assert version["spec"]["digest"] == "sha256:" + "b" * 64
    assert version["spec"]["source_uri"] == f"hf://acme/{name}"
    assert domain.version_state(_version(version), _asset(found))["tokenizer"] is None
    mcp = await asset(catalog, admin_key, "mcp_server", server)
    assert mcp is not None
    assert mcp["versions"][0]["tools"] == [
        {"name": "search", "access": "read_only"},
        {"name": "write_note", "access": "read_write"},
    ]


async def test_publisher_metadata_of_server_json_gives_tags_and_tools(
    catalog: httpx.AsyncClient, admin_key: str
) -> None:
    document = json.loads((MCP / "valid" / "with-remote.json").read_text())
    document["name"] = f"io.github.{uname('meta')}/remote"
    document["_meta"] = {
        "io.modelcontextprotocol.registry/publisher-provided": {
            "tags": ["general"],
            "tools": [{"name": "forecast", "accessType": "read_only"}],
        }
    }
    await ok(
        await catalog.post("/v1/imports/mcp-servers", json=document, headers=bearer(admin_key))
    )
    found = await asset(catalog, admin_key, "mcp_server", document["name"])
    assert found is not None
    [version] = found["versions"]
    assert version["tags"] == ["general"]
    assert version["tools"] == [{"name": "forecast", "access": "read_only"}]
    assert version["spec"]["transports"] == ["streamable-http"]


async def test_a_dry_run_reports_what_an_import_would_do_and_writes_nothing(
    catalog: httpx.AsyncClient, admin_key: str
) -> None:
    name = uname("dry")
    text = catalog_yaml([model(name)], [])
    url = "/v1/imports/catalog?dry_run=true"
    headers = {**bearer(admin_key), "content-type": "application/yaml"}
    planned = await ok(await catalog.post(url, content=text.encode(), headers=headers))
    assert (planned["created"], planned["unchanged"]) == (1, 0)
    assert planned["versions"][0]["version_id"] is None
    assert await asset(catalog, admin_key, "model", name) is None

    imported = await import_yaml(catalog, admin_key, text)
    assert imported["created"] == 1
    again = await ok(await catalog.post(url, content=text.encode(), headers=headers))
    assert (again["created"], again["unchanged"]) == (0, 1)


def _version(read: dict[str, Any]) -> Version:
    return Version(id=read["id"], version=read["version"], status=read["status"],
                   spec=read["spec"], tags=read["tags"], tools=read["tools"])  # fmt: skip


def _asset(read: dict[str, Any]) -> Asset:
    return Asset(id=read["id"], kind=read["kind"], name=read["name"])


async def test_a_models_tokenizer_is_kept_and_published_with_its_version(
    catalog: httpx.AsyncClient, admin_key: str
) -> None:
    """The gateway counts with it where the model's engine reports no usage."""
    name = uname("tokenized")
    uri = "pkg://llm_models/smollm2/tokenizer.json"
    text = catalog_yaml([model(name, serving={"runtime": "llama.cpp", "tokenizer": uri})])
    await import_yaml(catalog, admin_key, text)
    found = await asset(catalog, admin_key, "model", name)
    assert found is not None
    [version] = found["versions"]
    assert version["spec"]["serving"]["tokenizer"] == uri
    state = VersionState(**domain.version_state(_version(version), _asset(found)))
    assert state.tokenizer == uri


def _guide_server_json() -> tuple[dict[str, Any], dict[str, Any]]:
    """The server.json the platform guide shows, and the example file it names."""
    root = FIXTURES.parents[1]
    guide = (root / "docs" / "platform-guide.md").read_text()
    shown = guide.split("`examples/gitops/servers/weather.json`, complete:")[1]
    shown = shown.split("```json\n", 1)[1].split("```", 1)[0]
    example = root / "examples" / "gitops" / "servers" / "weather.json"
    return json.loads(shown), json.loads(example.read_text())


async def test_the_platform_guides_server_json_imports_with_its_remote_and_tools(
    catalog: httpx.AsyncClient, admin_key: str
) -> None:
    """The guide shows examples/gitops/servers/weather.json whole; both must say the same, and
    import as the guide explains: tools with access types, a remote the gateway can route."""
    shown, example = _guide_server_json()
    assert shown == example
    server = dict(example)
    server["name"] = f"io.example/{uname('weather')}"
    response = await catalog.post("/v1/imports/mcp-servers", json=server, headers=bearer(admin_key))
    assert response.status_code in (200, 201), response.text
    found = await asset(catalog, admin_key, "mcp_server", server["name"])
    assert found is not None
    [version] = found["versions"]
    assert version["tools"] == [
        {"name": "get_forecast", "access": "read_only"},
        {"name": "set_alert", "access": "read_write"},
    ]
    state = VersionState(**domain.version_state(_version(version), _asset(found)))
    assert state.remote == "https://weather.example.com/mcp"


@pytest.mark.parametrize(
    ("remotes", "routed"),
    [
        ([{"type": "sse", "url": "https://a.example/sse"}], None),
        ([{"type": "streamable-http", "url": "https://{h}/mcp", "variables": {"h": {}}}], None),
        (
            [
                {"type": "sse", "url": "https://a.example/sse"},
                {"type": "streamable-http", "url": "https://b.example/mcp"},
            ],
            "https://b.example/mcp",
        ),
    ],
)
def test_which_remote_the_gateway_routes(remotes: list[dict[str, Any]], routed: str | None) -> None:
    spec = {"format": "mcp-server.json", "server": {"remotes": remotes}}
    assert domain.mcp_remote(spec) == routed
    kubeflow = {"format": "kubeflow-catalog", "endpoints": {"streamable-http": "https://k/mcp"}}
    assert domain.mcp_remote(kubeflow) == "https://k/mcp"
