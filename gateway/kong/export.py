"""The live policy as a kong.yml for real Kong (``steward gateway export --format kong``).

What is exported, from what the gateway enforces now:

- one service and route per routed model with an approved catalog version
  (``/models/<name>/v1`` → the model's upstream) and per approved MCP server (``/mcp/<name>``),
  each guarded by ``key-auth``, an ``acl`` allowing the projects entitled to it, and Steward's
  ``steward-quota`` plugin (a Kong Python PDK plugin shipped in ``gateway/kong/``);
- one consumer per project holding an entitlement, in the ACL groups of what it may use;
- whatever Kong declarative config the gateway was given, unchanged.

API key secrets never leave authz (it holds only their HMAC), so no ``keyauth_credentials`` are
exported: issue Kong credentials to the exported consumers, or keep Steward's gateway in front.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway.kong.schema import KongConfig, parse
from gateway.replica import AuthReplica, CatalogReplica
from gateway.routes import RouteTable

KEY_NAMES = ["apikey", "x-api-key"]


def group(kind: str, asset: str) -> str:
    return f"{'model' if kind == 'model' else 'mcp'}:{asset}"


def export_kong(
    routes: RouteTable,
    auth: AuthReplica,
    catalog: CatalogReplica,
    kong: KongConfig | None = None,
    *,
    usage_url: str | None = None,
) -> dict[str, Any]:
    """A Kong 3.x declarative config (as a dict, ready for YAML) of the live policy."""
    services: list[dict[str, Any]] = []
    groups_by_project: dict[str, set[str]] = {}
    exported: list[tuple[str, str, str, str, str]] = []  # (kind, name, asset, upstream, path)
    for name, route in sorted(routes.models.items()):
        if catalog.approved("model", route.asset_name, route.version) is not None:
            exported.append(("model", name, route.asset_name, route.upstream, f"/models/{name}/v1"))
    for name, mcp in sorted(routes.mcp.items()):
        if catalog.approved("mcp_server", mcp.asset_name, mcp.version) is not None:
            exported.append(("mcp_server", name, mcp.asset_name, mcp.upstream, f"/mcp/{name}"))
    for kind, name, asset, upstream, path in exported:
        allowed = group(kind, asset)
        projects = sorted(p for p in _projects(auth, kind) if auth.entitled(p, kind, asset))
        for project in projects:
            groups_by_project.setdefault(project, set()).add(allowed)
        prefix = "model" if kind == "model" else "mcp"
        quota: dict[str, Any] = {"estimate_when_missing": True}
        if usage_url:
            quota["usage_url"] = usage_url
        services.append(
            {
                "name": f"{prefix}-{_slug(name)}",
                "url": upstream,
                "tags": ["steward", prefix, f"asset:{asset}"],
                "routes": [
                    {
                        "name": f"{prefix}-{_slug(name)}",
                        "paths": [path],
                        "strip_path": True,
                        "protocols": ["http", "https"],
                    }
                ],
                "plugins": [
                    {
                        "name": "key-auth",
                        "config": {"key_names": KEY_NAMES, "hide_credentials": True},
                    },
                    {"name": "acl", "config": {"allow": [allowed], "hide_groups_header": False}},
                    {"name": "steward-quota", "config": quota},
                ],
            }
        )
    consumers = [
        {
            "username": project,
            "custom_id": project,
            "tags": ["steward", "project"],
            "acls": [{"group": g} for g in sorted(groups)],
        }
        for project, groups in sorted(groups_by_project.items())
    ]
    document: dict[str, Any] = {
        "_format_version": "3.0",
        "_transform": True,
        "_comment": (
            f"Exported by Steward at {datetime.now(UTC).isoformat(timespec='seconds')}. "
            "API keys stay in Steward: give the consumers Kong credentials to call through Kong."
        ),
        "services": services,
        "consumers": consumers,
    }
    if kong is not None:
        declared = kong.to_declarative()
        for kind, items in declared.items():
            if kind.startswith("_"):
                continue
            document.setdefault(kind, []).extend(items)
    parse(document)  # what we hand out must load: validate it as Kong would
    return document


def _projects(auth: AuthReplica, kind: str) -> set[str]:
    return {p for p, k, _ in auth.entitlement_triples() if k == kind}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.~" else "-" for c in name)
