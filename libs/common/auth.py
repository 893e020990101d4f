"""Who may do what: roles, scopes, the one action table, and the FastAPI dependencies using it.

An action is allowed when the caller holds a role at least as strong as the action's in that
project **and** its credential carries the action's scope. Every service asks the same table.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, Request

from libs.common.errors import Forbidden, Unauthorized


class Role(StrEnum):
    VIEWER = "viewer"
    DEVELOPER = "developer"
    PROJECT_ADMIN = "project-admin"
    PLATFORM_ADMIN = "platform-admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def at_least(self, other: Role) -> bool:
        return self.rank >= other.rank


_RANK = {Role.VIEWER: 1, Role.DEVELOPER: 2, Role.PROJECT_ADMIN: 3, Role.PLATFORM_ADMIN: 4}
PROJECT_ROLES = (Role.VIEWER, Role.DEVELOPER, Role.PROJECT_ADMIN)

SCOPES: frozenset[str] = frozenset(
    {
        "projects:read",
        "projects:manage",
        "catalog:read",
        "catalog:write",
        "requests:write",
        "approvals:review",
        "endpoints:manage",
        "inference:invoke",
        "mcp:invoke",
        "usage:read",
        "keys:manage",
        "quotas:manage",
        "audit:read",
        # the replica snapshots (key digests, catalog, routes, quotas) a gateway loads: read only
        "snapshots:read",
    }
)


@dataclass(frozen=True)
class Rule:
    min_role: Role
    scope: str


V, D, PA, PLAT = Role.VIEWER, Role.DEVELOPER, Role.PROJECT_ADMIN, Role.PLATFORM_ADMIN

# The single source of truth for authorisation. Actions without a project in their path
# (e.g. reading the catalog) need the role in at least one project.
ACTIONS: Mapping[str, Rule] = {
    # authz
    "project.create": Rule(PLAT, "projects:manage"),
    "project.read": Rule(V, "projects:read"),
    "project.update": Rule(PA, "projects:manage"),
    "member.read": Rule(V, "projects:read"),
    "member.write": Rule(PA, "projects:manage"),
    "key.read": Rule(D, "keys:manage"),
    "key.write": Rule(D, "keys:manage"),
    "key.snapshot": Rule(PLAT, "snapshots:read"),
    "platform_key.write": Rule(PLAT, "keys:manage"),
    "entitlement.read": Rule(V, "projects:read"),
    "entitlement.write": Rule(PLAT, "projects:manage"),
    # catalog
    "catalog.read": Rule(V, "catalog:read"),
    "catalog.write": Rule(PLAT, "catalog:write"),
    "catalog.snapshot": Rule(PLAT, "snapshots:read"),
    # approval
    "request.read": Rule(V, "requests:write"),
    "request.write": Rule(D, "requests:write"),
    "request.review": Rule(PLAT, "approvals:review"),
    "policy.read": Rule(V, "requests:write"),
    "policy.write": Rule(PLAT, "approvals:review"),
    "audit.read": Rule(PLAT, "audit:read"),
    # inference
    "endpoint.read": Rule(V, "endpoints:manage"),
    "endpoint.manage": Rule(PA, "endpoints:manage"),
    "route.snapshot": Rule(PLAT, "snapshots:read"),
    "inference.invoke": Rule(D, "inference:invoke"),
    "mcp.invoke": Rule(D, "mcp:invoke"),
    # metering
    "usage.read": Rule(V, "usage:read"),
    "quota.manage": Rule(PLAT, "quotas:manage"),
    "quota.snapshot": Rule(PLAT, "snapshots:read"),
}

assert all(rule.scope in SCOPES for rule in ACTIONS.values())


@dataclass(frozen=True)
class Principal:
    """The caller, as every service sees it, whatever credential it came with."""

    subject: str
    credential: Literal["api_key", "oidc"]
    credential_id: str
    scopes: frozenset[str]
    platform_admin: bool = False
    project_roles: Mapping[str, Role] = field(default_factory=dict)

    def role_in(self, project: str | None) -> Role | None:
        if self.platform_admin:
            return Role.PLATFORM_ADMIN
        if project is None:
            return max(self.project_roles.values(), key=lambda r: r.rank, default=None)
        return self.project_roles.get(project)

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "credential": self.credential,
            "credential_id": self.credential_id,
            "scopes": sorted(self.scopes),
            "platform_admin": self.platform_admin,
            "project_roles": {p: r.value for p, r in sorted(self.project_roles.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Principal:
        return cls(
            subject=data["subject"],
            credential=data["credential"],
            credential_id=data["credential_id"],
            scopes=frozenset(data["scopes"]),
            platform_admin=bool(data["platform_admin"]),
            project_roles={p: Role(r) for p, r in data["project_roles"].items()},
        )


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


def decide(principal: Principal, action: str, project: str | None) -> Decision:
    """The decision, with a reason a person can act on."""
    rule = ACTIONS.get(action)
    if rule is None:
        return Decision(False, f"unknown action {action!r}")
    role = principal.role_in(project)
    where = f"project {project!r}" if project else "any project"
    if role is None:
        return Decision(False, f"no role in {where}")
    if not role.at_least(rule.min_role):
        return Decision(False, f"{action} needs role {rule.min_role.value} in {where}")
    if rule.scope not in principal.scopes:
        return Decision(False, f"the credential lacks the scope {rule.scope!r}")
    return Decision(True, "allowed")


class PrincipalResolver(Protocol):
    async def resolve(self, credential: str) -> Principal: ...


NO_CREDENTIAL = (
    "no credential: send an API key (Authorization: Bearer stw_…, apikey or x-api-key header)"
    " or an OIDC bearer token"
)


def credential_from(request: Request) -> str | None:
    headers = request.headers
    for name in ("apikey", "x-api-key"):
        if value := headers.get(name):
            return value.strip()
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


async def get_principal(request: Request) -> Principal:
    credential = credential_from(request)
    if not credential:
        raise Unauthorized(NO_CREDENTIAL)
    resolver: PrincipalResolver = request.app.state.principal_resolver
    principal = await resolver.resolve(credential)
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def Authorized(action: str) -> Any:
    """``principal: Annotated[Principal, Authorized("member.write")]``; project from the path."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action}")

    async def check(request: Request, principal: PrincipalDep) -> Principal:
        project = request.path_params.get("project")
        decision = decide(principal, action, project)
        if not decision.allowed:
            raise Forbidden(decision.reason)
        return principal

    dependency: Callable[..., Coroutine[Any, Any, Principal]] = check
    return Depends(dependency)
