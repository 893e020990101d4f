"""``steward diff -f DIR`` and ``steward apply -f DIR``: a folder of YAML is the desired state.

Documents (any number per file, ``---`` separated) have ``apiVersion: steward/v1``, a ``kind``,
a ``metadata.name`` and a ``spec``; YAML files without such documents (a catalog.yaml that a
``Catalog`` document points at) are data, not manifests, and are skipped:

- ``Project``: display name, ``members`` (subject → role) and, when given, ``entitlements``
  (``{kind, name}``, and for an MCP server ``toolAccess``/``tools`` to grant part of it; for a
  model, ``fallbacks``: the gateway models to fall back to, in order).
  Members (and entitlements, when listed) of a declared project are reconciled exactly:
  what the file does not list is removed. Projects the files do not declare are left alone.
- ``Catalog``: ``spec.file`` (a Kubeflow-shaped catalog.yaml) and/or ``spec.mcpServers`` (a
  folder of ``server.json``), relative to the document's file; imported idempotently.
- ``Policy``: an auto-approve policy of the approval service (the spec is its rule); with
  ``--prune``, policies the files do not declare are deleted (like ``kubectl apply --prune``).
- ``Quota``: a budget of ``spec.project`` (``window``, ``limits`` of ``inputTokens``,
  ``outputTokens``, ``totalTokens``, ``requests``; optional ``keyId``, ``model``,
  ``softThreshold``, ``webhookUrl``), one per (project, key, model, window); with ``--prune``,
  the other quotas of the projects the files give quotas to are deleted.
- ``Price``: the price of ``spec.model`` (a catalog asset; ``version`` for one version's own):
  ``inputPer1k``, ``outputPer1k`` and ``gpuHour``, in force from when it is applied.

``diff`` changes nothing and exits 1 when the live state drifted from the files (0 when in sync),
so a CI pipeline can gate on it; ``apply`` makes the changes and a second ``apply`` finds none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from cli.client import Api, CliError
from cli.commands import import_body
from cli.output import Format, OutputOpt, console, emit

KINDS = ("Project", "Catalog", "Policy", "Quota", "Price")


@dataclass
class Document:
    kind: str
    name: str
    spec: dict[str, Any]
    source: Path


@dataclass
class Change:
    action: str  # create | update | delete
    target: str
    detail: str = ""
    run: Callable[[], object] = field(default=lambda: None, repr=False)

    def row(self) -> dict[str, str]:
        return {"action": self.action, "target": self.target, "detail": self.detail}


API_VERSION = "steward/v1"


def load(folder: Path) -> list[Document]:
    """Every manifest under ``folder``, validated before any call is made."""
    files = sorted(p for p in folder.rglob("*") if p.suffix in {".yaml", ".yml"})
    if not files:
        raise CliError(f"{folder} holds no YAML files")
    documents: list[Document] = []
    seen: set[tuple[str, str]] = set()
    for path in files:
        try:
            loaded = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            raise CliError(f"{path}: not valid YAML: {exc}") from exc
        if not any(isinstance(d, dict) and d.get("apiVersion") == API_VERSION for d in loaded):
            continue
        for i, raw in enumerate(d for d in loaded if d is not None):
            where = f"{path}#{i}"
            if not isinstance(raw, dict) or raw.get("apiVersion") != API_VERSION:
                raise CliError(f"{where}: apiVersion must be {API_VERSION}")
            if raw.get("kind") not in KINDS:
                raise CliError(f"{where}: kind must be one of {', '.join(KINDS)}")
            name = (raw.get("metadata") or {}).get("name")
            if not isinstance(name, str) or not name:
                raise CliError(f"{where}: metadata.name is required")
            spec = raw.get("spec") or {}
            if not isinstance(spec, dict):
                raise CliError(f"{where}: spec must be a mapping")
            if (raw["kind"], name) in seen:
                raise CliError(f"{where}: {raw['kind']} {name!r} is declared twice")
            seen.add((raw["kind"], name))
            documents.append(Document(raw["kind"], name, spec, path))
    return documents


def plan(api: Api, documents: list[Document], *, prune: bool = False) -> list[Change]:
    changes: list[Change] = []
    for doc in documents:
        if doc.kind == "Project":
            changes += _project(api, doc)
        elif doc.kind == "Catalog":
            changes += _catalog(api, doc)
    policies = [d for d in documents if d.kind == "Policy"]
    changes += _policies(api, policies, prune)
    changes += _quotas(api, [d for d in documents if d.kind == "Quota"], prune)
    for doc in documents:
        if doc.kind == "Price":
            changes += _price(api, doc)
    return changes


def _project(api: Api, doc: Document) -> list[Change]:
    name = doc.name
    changes: list[Change] = []
    live = api.call("GET", "authz", f"/v1/projects/{name}", missing_ok=True)
    if live is None:
        body = {"name": name, "display_name": doc.spec.get("displayName") or name}
        changes.append(
            Change(
                "create",
                f"project/{name}",
                run=partial(api.call, "POST", "authz", "/v1/projects", json_body=body),
            )
        )
        members: dict[str, str] = {}
        entitlements: dict[tuple[str, str], Limits] = {}
        fallbacks: dict[str, list[str]] = {}
    else:
        display = doc.spec.get("displayName") or name
        if live["display_name"] != display:
            changes.append(
                Change(
                    "update",
                    f"project/{name}",
                    f"displayName {live['display_name']!r} → {display!r}",
                    partial(
                        api.call,
                        "PATCH",
                        "authz",
                        f"/v1/projects/{name}",
                        json_body={"display_name": display},
                    ),
                )
            )
        listed = api.call("GET", "authz", f"/v1/projects/{name}/members")
        members = {m["subject"]: m["role"] for m in listed}
        granted = api.call("GET", "authz", f"/v1/projects/{name}/entitlements")
        entitlements = {
            (e["asset_kind"], e["asset_name"]): _limits(e.get("tool_access"), e.get("tools"))
            for e in granted
        }
        fallbacks = {e["asset_name"]: e.get("fallbacks") or [] for e in granted}

    wanted = {m["subject"]: m["role"] for m in doc.spec.get("members", [])}
    for subject, role in sorted(wanted.items()):
        if members.get(subject) != role:
            path = f"/v1/projects/{name}/members/{subject}"
            action = "update" if subject in members else "create"
            changes.append(
                Change(
                    action,
                    f"project/{name}/member/{subject}",
                    f"role {members.get(subject, '-')} → {role}",
                    partial(api.call, "PUT", "authz", path, json_body={"role": role}),
                )
            )
    for subject in sorted(set(members) - set(wanted)):
        path = f"/v1/projects/{name}/members/{subject}"
        changes.append(
            Change(
                "delete",
                f"project/{name}/member/{subject}",
                "not in the files",
                partial(api.call, "DELETE", "authz", path),
            )
        )

    if "entitlements" in doc.spec:
        want = {
            (e["kind"], e["name"]): _limits(e.get("toolAccess"), e.get("tools"))
            for e in doc.spec["entitlements"]
        }
        for (kind, asset), limits in sorted(want.items()):
            held = entitlements.get((kind, asset))
            if held == limits:
                continue
            path = f"/v1/projects/{name}/entitlements/{kind}/{asset}"
            body = {"reason": "gitops", "tool_access": limits[0], "tools": limits[1]}
            changes.append(
                Change(
                    "create" if held is None else "update",
                    f"project/{name}/entitlement/{kind}/{asset}",
                    "" if held is None else f"limits {_show(held)} → {_show(limits)}",
                    partial(api.call, "PUT", "authz", path, json_body=body),
                )
            )
        chains = {
            e["name"]: list(e.get("fallbacks") or [])
            for e in doc.spec["entitlements"]
            if e["kind"] == "model"
        }
        for model, chain in sorted(chains.items()):
            if fallbacks.get(model, []) == chain:
                continue
            path = f"/v1/projects/{name}/fallbacks/{model}"
            changes.append(
                Change(
                    "update",
                    f"project/{name}/fallbacks/{model}",
                    f"{fallbacks.get(model, [])} → {chain}",
                    partial(api.call, "PUT", "authz", path, json_body={"chain": chain}),
                )
            )
        for kind, asset in sorted(set(entitlements) - set(want)):
            path = f"/v1/projects/{name}/entitlements/{kind}/{asset}"
            changes.append(
                Change(
                    "delete",
                    f"project/{name}/entitlement/{kind}/{asset}",
                    "not in the files",
                    partial(api.call, "DELETE", "authz", path),
                )
            )
    return changes


# What an entitlement covers of an MCP server: (access types, tool names), None for no limit.
Limits = tuple[list[str] | None, list[str] | None]


def _limits(tool_access: Any, tools: Any) -> Limits:
    return (sorted(tool_access) if tool_access else None, sorted(tools) if tools else None)


def _show(limits: Limits) -> str:
    access, tools = limits
    if access is None and tools is None:
        return "all tools"
    return " ".join(f"{k}={','.join(v)}" for k, v in (("access", access), ("tools", tools)) if v)


def _catalog(api: Api, doc: Document) -> list[Change]:
    changes: list[Change] = []
    for key in ("file", "mcpServers"):
        if key not in doc.spec:
            continue
        path = (doc.source.parent / doc.spec[key]).resolve()
        if not path.exists():
            raise CliError(f"{doc.source}: catalog {doc.name}: {path} does not exist")
        route, body, content_type = import_body(path)
        dry = api.call(
            "POST",
            "catalog",
            route,
            content=body,
            content_type=content_type,
            params={"dry_run": "true"},
        )
        for version in dry["versions"]:
            if version["outcome"] == "unchanged":
                continue
            changes.append(
                Change(
                    "create" if version["outcome"] == "created" else "update",
                    f"catalog/{version['kind']}/{version['name']}@{version['version']}",
                    f"from {path.name}",
                )
            )
        if any(v["outcome"] != "unchanged" for v in dry["versions"]):
            # One import applies every entry of the file at once (all or nothing).
            changes[-1].run = partial(
                api.call, "POST", "catalog", route, content=body, content_type=content_type
            )
    return changes


POLICY_READ_ONLY = {"name", "updated_at", "updated_by"}


def _policies(api: Api, documents: list[Document], prune: bool) -> list[Change]:
    live = {p["name"]: p for p in api.call("GET", "approval", "/v1/policies")}
    changes: list[Change] = []
    for doc in documents:
        current = live.get(doc.name)
        if current is not None:
            current_rule = {k: v for k, v in current.items() if k not in POLICY_READ_ONLY}
            merged = {**current_rule, **doc.spec}
            if merged == current_rule:
                continue
        path = f"/v1/policies/{doc.name}"
        changes.append(
            Change(
                "update" if current else "create",
                f"policy/{doc.name}",
                run=partial(api.call, "PUT", "approval", path, json_body=doc.spec),
            )
        )
    for name in sorted(set(live) - {d.name for d in documents} if prune else ()):
        path = f"/v1/policies/{name}"
        changes.append(
            Change(
                "delete",
                f"policy/{name}",
                "not in the files",
                partial(api.call, "DELETE", "approval", path),
            )
        )
    return changes


# Quota limits: the file's names → the API's.
QUOTA_LIMITS = {
    "inputTokens": "input_tokens",
    "outputTokens": "output_tokens",
    "totalTokens": "total_tokens",
    "requests": "requests",
}


def _quota_body(spec: dict[str, Any]) -> dict[str, Any]:
    limits = spec.get("limits") or {}
    unknown = set(limits) - set(QUOTA_LIMITS)
    if unknown:
        raise CliError(f"quota limits: unknown {sorted(unknown)}; use {sorted(QUOTA_LIMITS)}")
    return {
        "limits": {api_name: limits.get(name) for name, api_name in QUOTA_LIMITS.items()},
        "soft_threshold": spec.get("softThreshold"),
        "webhook_url": spec.get("webhookUrl"),
    }


def _quotas(api: Api, documents: list[Document], prune: bool) -> list[Change]:
    changes: list[Change] = []
    projects = sorted({str(d.spec.get("project")) for d in documents})
    live: dict[tuple[Any, ...], dict[str, Any]] = {}
    for project in projects:
        for q in api.call("GET", "metering", "/v1/quotas", params={"project": project}) or []:
            live[(q["project"], q["key_id"], q["model"], q["window"])] = q
    declared = set()
    for doc in documents:
        spec = doc.spec
        key = (str(spec.get("project")), spec.get("keyId"), spec.get("model"), spec.get("window"))
        if key in declared:
            raise CliError(f"{doc.source}: quota {doc.name}: another document has its scope")
        declared.add(key)
        body = _quota_body(spec)
        current = live.get(key)
        target = f"quota/{doc.name}"
        if current is None:
            create = {
                **{k: v for k, v in body.items() if v is not None},
                "limits": {k: v for k, v in body["limits"].items() if v is not None},
                "window": spec.get("window"),
                "key_id": spec.get("keyId"),
                "model": spec.get("model"),
            }
            path = f"/v1/projects/{key[0]}/quotas"
            changes.append(
                Change(
                    "create",
                    target,
                    run=partial(api.call, "POST", "metering", path, json_body=create),
                )
            )
            continue
        have = {
            "limits": {k: current["limits"].get(k) for k in QUOTA_LIMITS.values()},
            "soft_threshold": current["soft_threshold"],
            "webhook_url": current["webhook_url"],
        }
        wanted = {
            **body,
            "soft_threshold": body["soft_threshold"] or have["soft_threshold"],
        }
        if wanted == have:
            continue
        drift = ", ".join(f"{k} {have[k]} → {wanted[k]}" for k in wanted if wanted[k] != have[k])
        path = f"/v1/projects/{key[0]}/quotas/{current['id']}"
        changes.append(
            Change(
                "update",
                target,
                drift,
                partial(api.call, "PATCH", "metering", path, json_body=wanted),
            )
        )
    for key in sorted(set(live) - declared if prune else (), key=str):
        q = live[key]
        path = f"/v1/projects/{q['project']}/quotas/{q['id']}"
        changes.append(
            Change(
                "delete",
                f"quota/{q['project']}/{q['window']}/{q['key_id'] or '*'}/{q['model'] or '*'}",
                "not in the files",
                partial(api.call, "DELETE", "metering", path),
            )
        )
    return changes


PRICE_FIELDS = {"inputPer1k": "input_per_1k", "outputPer1k": "output_per_1k", "gpuHour": "gpu_hour"}


def _price(api: Api, doc: Document) -> list[Change]:
    model, version = doc.spec.get("model"), doc.spec.get("version")
    if not model:
        raise CliError(f"{doc.source}: price {doc.name}: spec.model is required")
    wanted = {
        api_name: None if doc.spec.get(name) is None else Decimal(str(doc.spec[name]))
        for name, api_name in PRICE_FIELDS.items()
    }
    listed = api.call("GET", "metering", "/v1/prices", params={"model": model}) or []
    now = [
        p
        for p in listed
        if p["version"] == version and not p["withdrawn"] and p["effective_until"] is None
    ]
    have = None
    if now:
        current = now[-1]
        have = {
            k: None if current[k] is None else Decimal(str(current[k]))
            for k in PRICE_FIELDS.values()
        }
    if have == wanted:
        return []
    body = {k: None if v is None else str(v) for k, v in wanted.items()}
    params = {"version": version} if version else None
    target = f"price/{model}" + (f"@{version}" if version else "")
    return [
        Change(
            "create" if have is None else "update",
            target,
            "" if have is None else f"{have} → {wanted}",
            partial(
                api.call, "PUT", "metering", f"/v1/prices/{model}", json_body=body, params=params
            ),
        )
    ]


FileOpt = Annotated[
    Path, typer.Option("--filename", "-f", exists=True, file_okay=False, help="a folder of YAML")
]
PruneOpt = Annotated[bool, typer.Option(help="also delete policies the files do not declare")]


def diff(filename: FileOpt, prune: PruneOpt = False, output: OutputOpt = Format.table) -> None:
    """Show what ``apply`` would change; exit 1 on drift, 0 when in sync."""
    with console().status("comparing with the live state…"):
        changes = plan(Api(), load(filename), prune=prune)
    emit([c.row() for c in changes], output, ["action", "target", "detail"])
    if changes:
        raise typer.Exit(1)


def apply(filename: FileOpt, prune: PruneOpt = False, output: OutputOpt = Format.table) -> None:
    """Make the live state match the files; running it twice changes nothing the second time."""
    api = Api()
    changes = plan(api, load(filename), prune=prune)
    for change in changes:
        with console().status(f"{change.action} {change.target}…"):
            change.run()
    emit([c.row() for c in changes], output, ["action", "target", "detail"])
    if output is Format.table:
        console().print(f"{len(changes)} change(s) applied")
