"""The resource commands: login, projects, catalog, requests and reviews, keys, audit,
endpoints and usage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from cli.client import Api, CliError, save_key
from cli.output import Format, OutputOpt, console, emit


def api() -> Api:
    return Api()


def fail(message: str, code: int = 1) -> typer.Exit:
    console().print(f"[red]{message}[/red]")
    return typer.Exit(code)


def login(
    key: Annotated[
        str, typer.Option(prompt="API key", hide_input=True, help="A Steward API key (stw_…)")
    ],
) -> None:
    """Check an API key and store it for the next commands (mode 0600)."""
    me = Api(key=key).call("GET", "authz", "/v1/whoami")
    path = save_key(key)
    console().print(f"Logged in as [bold]{me['subject']}[/bold]; key stored in {path}")


def whoami(output: OutputOpt = Format.table) -> None:
    """Who the stored credential is, with its roles and scopes."""
    emit(api().call("GET", "authz", "/v1/whoami"), output)


# -- projects ---------------------------------------------------------------------------------

projects = typer.Typer(help="Projects and their members.", no_args_is_help=True)


@projects.command("list")
def projects_list(output: OutputOpt = Format.table) -> None:
    emit(api().call("GET", "authz", "/v1/projects"), output, ["name", "display_name", "created_by"])


@projects.command("create")
def projects_create(name: str, output: OutputOpt = Format.table) -> None:
    emit(api().call("POST", "authz", "/v1/projects", json_body={"name": name}), output)


@projects.command("members")
def projects_members(project: str, output: OutputOpt = Format.table) -> None:
    emit(api().call("GET", "authz", f"/v1/projects/{project}/members"), output)


# -- catalog ----------------------------------------------------------------------------------

catalog = typer.Typer(help="The validated catalog of models and MCP servers.", no_args_is_help=True)


@catalog.command("list")
def catalog_list(
    status: Annotated[str | None, typer.Option(help="e.g. approved: the dropdown")] = None,
    kind: Annotated[str | None, typer.Option(help="model or mcp_server")] = None,
    query: Annotated[str | None, typer.Option("--query", "-q", help="text search")] = None,
    output: OutputOpt = Format.table,
) -> None:
    """Catalog versions; ``--status approved`` lists only what may be used."""
    items: list[dict[str, Any]] = []
    cursor = None
    client = api()
    while True:
        page = client.call(
            "GET",
            "catalog",
            "/v1/catalog",
            params={"status": status, "kind": kind, "q": query, "cursor": cursor, "limit": 200},
        )
        items.extend(page["items"])
        cursor = page.get("next_cursor")
        if not cursor:
            break
    emit(items, output, ["kind", "name", "version", "status", "provider", "tags"])


@catalog.command("show")
def catalog_show(kind: str, name: str, output: OutputOpt = Format.table) -> None:
    """One asset with all its versions (provenance, licence, tools)."""
    found = api().call("GET", "catalog", f"/v1/assets/{kind}/{name}", missing_ok=True)
    if found is None:
        raise fail(f"no {kind} named {name!r} in the catalog")
    if output is Format.json:
        emit(found, output)
        return
    console().print(f"[bold]{found.get('kind')} {found.get('name')}[/bold]")
    emit(found.get("versions", []), output, ["version", "status", "provider", "tags"])


def import_body(path: Path) -> tuple[str, bytes, str]:
    """(import route, body, content type) for a catalog.yaml, a server.json or a folder of them."""
    if path.is_dir():
        documents = [json.loads(p.read_text()) for p in sorted(path.glob("*.json"))]
        if not documents:
            raise CliError(f"{path} holds no *.json server files")
        return "/v1/imports/mcp-servers", json.dumps(documents).encode(), "application/json"
    if path.suffix == ".json":
        return "/v1/imports/mcp-servers", path.read_bytes(), "application/json"
    return "/v1/imports/catalog", path.read_bytes(), "application/yaml"


@catalog.command("import")
def catalog_import(
    path: Annotated[
        Path, typer.Argument(exists=True, help="catalog.yaml, server.json or a folder")
    ],
    dry_run: Annotated[bool, typer.Option(help="report, change nothing")] = False,
    output: OutputOpt = Format.table,
) -> None:
    """Import models and MCP servers as drafts; importing twice changes nothing."""
    route, body, content_type = import_body(path)
    with console().status(f"importing {path}…"):
        result = api().call(
            "POST",
            "catalog",
            route,
            content=body,
            content_type=content_type,
            params={"dry_run": "true" if dry_run else None},
        )
    if output is Format.json:
        emit(result, output)
        return
    emit(result["versions"], output, ["kind", "name", "version", "outcome"])
    console().print(
        f"created {result['created']}, updated {result['updated']}, "
        f"unchanged {result['unchanged']}" + (" (dry run)" if dry_run else "")
    )


# -- requests and reviews ---------------------------------------------------------------------

requests = typer.Typer(help="Requests for assets, access, endpoints and quotas.")


def _payload(text: str) -> dict[str, Any]:
    """``@file.yaml`` or inline JSON/YAML."""
    raw = Path(text[1:]).read_text() if text.startswith("@") else text
    data = yaml.safe_load(raw)
    if not isinstance(data, dict):
        raise CliError("the payload must be a mapping (JSON or YAML object)")
    return data


@requests.command("create")
def request_create(
    project: str,
    kind: Annotated[str, typer.Argument(help="asset, access, endpoint or quota")],
    payload: Annotated[str, typer.Option(help="JSON/YAML object, or @file")],
    output: OutputOpt = Format.table,
) -> None:
    """File a request; auto-approve policies may decide it at once."""
    body = {"kind": kind, "payload": _payload(payload)}
    created = api().call("POST", "approval", f"/v1/projects/{project}/requests", json_body=body)
    emit(created, output, ["id", "kind", "project", "status", "due_at"])


@requests.command("list")
def request_list(
    project: Annotated[str | None, typer.Option(help="one project")] = None,
    status: Annotated[str | None, typer.Option(help="pending, approved, …")] = None,
    output: OutputOpt = Format.table,
) -> None:
    """The queue (platform admins) or a project's requests."""
    path = f"/v1/projects/{project}/requests" if project else "/v1/requests"
    page = api().call("GET", "approval", path, params={"status": status, "limit": 200})
    emit(page["items"], output, ["id", "kind", "project", "requester", "status", "overdue"])


def approve(
    request_id: str,
    comment: Annotated[str, typer.Option(help="why")] = "",
    output: OutputOpt = Format.table,
) -> None:
    """Approve a request (never your own)."""
    decided = api().call(
        "POST", "approval", f"/v1/requests/{request_id}/approve", json_body={"comment": comment}
    )
    emit(decided, output, ["id", "kind", "project", "status", "decided_by"])


def reject(
    request_id: str,
    comment: Annotated[str, typer.Option(help="why (required)")],
    output: OutputOpt = Format.table,
) -> None:
    """Reject a request, saying why."""
    decided = api().call(
        "POST", "approval", f"/v1/requests/{request_id}/reject", json_body={"comment": comment}
    )
    emit(decided, output, ["id", "kind", "project", "status", "decided_by"])


# -- keys -------------------------------------------------------------------------------------

keys = typer.Typer(help="API keys: shown once at creation.", no_args_is_help=True)
KEY_COLUMNS = ["id", "name", "owner", "role", "scopes", "status", "expires_at", "last_used_at"]


@keys.command("list")
def keys_list(project: str, output: OutputOpt = Format.table) -> None:
    emit(api().call("GET", "authz", f"/v1/projects/{project}/keys"), output, KEY_COLUMNS)


def _show_new_key(created: dict[str, Any], output: Format) -> None:
    if output is Format.json:
        emit(created, output)
        return
    emit(created, output, KEY_COLUMNS)
    console().print(f"\nThe key (shown once, store it now):\n\n  [bold green]{created['key']}[/]\n")


@keys.command("create")
def keys_create(
    project: str,
    name: Annotated[str, typer.Option(help="what the key is for")],
    scope: Annotated[list[str], typer.Option(help="repeat for several scopes")],
    owner: Annotated[str | None, typer.Option(help="a member to issue it to")] = None,
    role: Annotated[str | None, typer.Option(help="viewer, developer or project-admin")] = None,
    expires_at: Annotated[str | None, typer.Option(help="ISO time with zone")] = None,
    output: OutputOpt = Format.table,
) -> None:
    body = {"name": name, "scopes": scope, "owner": owner, "role": role, "expires_at": expires_at}
    body = {k: v for k, v in body.items() if v is not None}
    _show_new_key(
        api().call("POST", "authz", f"/v1/projects/{project}/keys", json_body=body), output
    )


@keys.command("rotate")
def keys_rotate(
    project: str,
    key_id: str,
    grace_seconds: Annotated[
        int | None, typer.Option(help="how long the old key still works")
    ] = None,
    output: OutputOpt = Format.table,
) -> None:
    body = {"grace_seconds": grace_seconds} if grace_seconds is not None else None
    path = f"/v1/projects/{project}/keys/{key_id}/rotate"
    _show_new_key(api().call("POST", "authz", path, json_body=body), output)


@keys.command("revoke")
def keys_revoke(project: str, key_id: str, output: OutputOpt = Format.table) -> None:
    revoked = api().call("DELETE", "authz", f"/v1/projects/{project}/keys/{key_id}")
    emit(revoked, output, KEY_COLUMNS)


# -- audit ------------------------------------------------------------------------------------

audit = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)


@audit.command("verify")
def audit_verify(output: OutputOpt = Format.table) -> None:
    """Replay the keyed hash chain against the latest signed checkpoint; exits 1 when any record
    was edited, deleted, reordered, cut or rewritten."""
    result = api().call("GET", "approval", "/v1/audit/verify")
    if output is Format.json:
        emit(result, output)
    elif result["ok"]:
        head = result["head_hash"][:16]
        anchored = result.get("checkpoint")
        signed = f", signed up to {anchored['seq']} at {anchored['at']}" if anchored else ""
        console().print(
            f"[green]verified[/green]: {result['records']} records, head {head}…{signed}"
        )
    else:
        emit(result["problems"], output, ["seq", "problem", "detail"])
    if not result["ok"]:
        raise typer.Exit(1)


report = typer.Typer(help="Reports for audits and reviews.", no_args_is_help=True)


@report.command("audit")
def report_audit(
    start: Annotated[str, typer.Option("--from", help="ISO date or time (UTC without a zone)")],
    end: Annotated[str, typer.Option("--to", help="ISO date or time, excluded")],
    fmt: Annotated[str, typer.Option("--format", help="html, csv or json")] = "html",
    out: Annotated[Path | None, typer.Option("--output", "-o", help="write to this file")] = None,
) -> None:
    """The audit report of a period: approvals and their lead times against the SLA, keys,
    access and catalog changes, and the audit chain's verification. Exits 1 if the chain does
    not verify."""
    if fmt not in ("html", "csv", "json"):
        raise CliError("--format: html, csv or json")
    params = {"start": start, "end": end, "format": fmt}
    body = api().call("GET", "approval", "/v1/reports/audit", params=params)
    text = json.dumps(body, indent=2) if fmt == "json" else str(body)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        console().print(f"wrote {out}")
    verified = api().call("GET", "approval", "/v1/audit/verify")
    if not verified["ok"]:
        console().print("[red]the audit chain does not verify[/red]: see steward audit verify")
        raise typer.Exit(1)


# -- endpoints and usage ----------------------------------------------------------------------

endpoints = typer.Typer(help="Inference endpoints of a project.", no_args_is_help=True)
ENDPOINT_COLUMNS = ["id", "route_name", "status", "runtime", "replicas", "gpus", "reason"]


@endpoints.command("list")
def endpoint_list(project: str, output: OutputOpt = Format.table) -> None:
    found = api().call("GET", "inference", f"/v1/projects/{project}/endpoints")
    emit(found, output, ENDPOINT_COLUMNS)


@endpoints.command("delete")
def endpoint_delete(project: str, endpoint_id: str, output: OutputOpt = Format.table) -> None:
    """Delete an endpoint: its route goes at once, its runtime is torn down."""
    path = f"/v1/projects/{project}/endpoints/{endpoint_id}"
    emit(api().call("DELETE", "inference", path), output, ENDPOINT_COLUMNS)


ENDPOINT_COST_COLUMNS = [
    "endpoint_id",
    "project",
    "model",
    "status",
    "gpus_held",
    "gpu_hours",
    "cost",
    "estimated_cost",
    "plan_used",
    "over_plan",
]


@endpoints.command("costs")
def endpoint_costs(
    project: Annotated[str | None, typer.Option(help="one project (platform admins: all)")] = None,
    output: OutputOpt = Format.table,
) -> None:
    """GPU-hours and cost of dedicated endpoints so far, beside the plan approved for each."""
    report = api().call("GET", "metering", "/v1/usage/endpoints", params={"project": project})
    if output is Format.json:
        emit(report, output)
        return
    rows = [
        {
            **e,
            "gpu_hours": round(e["gpu_hours"], 2),
            "estimated_cost": e["plan"]["estimated_cost"] if e["plan"] else None,
            "plan_used": None if e["plan_used"] is None else f"{e['plan_used']:.0%}",
        }
        for e in report["endpoints"]
    ]
    emit(rows, output, ENDPOINT_COST_COLUMNS)
    console().print(
        f"{report['gpu_hours']:.2f} GPU-hours, {report['cost']:.2f} {report['currency']} "
        f"(planned {report['estimated_cost']:.2f})"
    )


USAGE_COLUMNS = ["requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "cost"]


def usage(
    project: Annotated[str | None, typer.Option(help="one project (platform admins: all)")] = None,
    group_by: Annotated[
        str | None,
        typer.Option(help="project, model, credential, endpoint, tool (comma-separated)"),
    ] = None,
    start: Annotated[str | None, typer.Option(help="ISO time with zone; default 24 h ago")] = None,
    end: Annotated[str | None, typer.Option(help="ISO time with zone; default now")] = None,
    csv: Annotated[bool, typer.Option("--csv", help="the hourly series as CSV")] = False,
    output: OutputOpt = Format.table,
) -> None:
    """Tokens, requests, errors and cost — totals per group, or the series as CSV."""
    params = {"project": project, "group_by": group_by, "start": start, "end": end}
    if csv:
        typer.echo(api().call("GET", "metering", "/v1/usage/export.csv", params=params), nl=False)
        return
    report = api().call("GET", "metering", "/v1/usage", params=params)
    if output is Format.json:
        emit(report, output)
        return
    groups = [g.strip() for g in (group_by or "").split(",") if g.strip()]
    # Tool calls carry no tokens worth a column; their bytes are what they move.
    extra = ["request_bytes", "response_bytes"] if "tool" in groups else []
    emit(report["rows"], output, [*groups, *USAGE_COLUMNS, *extra])
