"""Authz rules and state changes. Every change emits its events and an audit record in the same
transaction, through the unit of work.

Time comes in as ``now``, read once per call from the service's clock (``libs.common.db.Clock``:
the wall clock in production, one a test moves): key expiry, rotation grace and revocation times
are decided on it, never on the wall clock here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from libs.common import apikeys
from libs.common.auth import SCOPES, Principal, Role
from libs.common.errors import Conflict, Forbidden, NotFound, Unprocessable
from libs.common.events import EventPayload
from libs.common.events.authz import (
    EntitlementGranted,
    EntitlementRevoked,
    KeyCreated,
    KeyRevoked,
    KeyUpdated,
    MemberChanged,
    ProjectCreated,
    ProjectUpdated,
    check_tool_limits,
)
from libs.common.uow import UnitOfWork
from services.authz import repository as repo
from services.authz.models import ApiKey, Entitlement, Member, PlatformAdmin, Project

BOOTSTRAP_ADMIN = "admin"


async def _mirrored(uow: UnitOfWork, payload: EventPayload, *, entity: str) -> None:
    """Emit a change the gateway's replica mirrors, and advance the replica revision with it
    (what a gateway cut off from the events polls)."""
    await uow.emit(payload, entity=entity)
    repo.advance_replica_revision_at_commit(uow.session)


# -- projects and members ---------------------------------------------------------------------


async def create_project(uow: UnitOfWork, name: str, display_name: str | None) -> Project:
    if await repo.project_exists(uow.session, name):
        raise Conflict(f"project {name!r} already exists")
    project = Project(name=name, display_name=display_name or name, created_by=uow.actor)
    uow.session.add(project)
    await uow.session.flush()
    await uow.emit(ProjectCreated(project=name, display_name=project.display_name), entity=name)
    await uow.audit(
        "project.create",
        f"project/{name}",
        project=name,
        after={"display_name": project.display_name},
    )
    return project


async def rename_project(uow: UnitOfWork, project: Project, display_name: str) -> Project:
    """Change the display name (the name is the project's identity and never changes)."""
    if project.display_name == display_name:
        return project
    before = {"display_name": project.display_name}
    project.display_name = display_name
    await uow.session.flush()
    await uow.emit(
        ProjectUpdated(project=project.name, display_name=display_name), entity=project.name
    )
    await uow.audit(
        "project.update",
        f"project/{project.name}",
        project=project.name,
        before=before,
        after={"display_name": display_name},
    )
    return project


async def put_member(
    uow: UnitOfWork, project: Project, subject: str, role: Role, *, now: datetime
) -> Member:
    """Add a member or change its role. Lowering a role revokes the member's stronger keys."""
    member = await repo.member(uow.session, project, subject)
    before = {"role": member.role} if member else None
    if member is None:
        member = Member(project_id=project.id, subject=subject, role=role.value)
        uow.session.add(member)
    elif member.role == role.value:
        return member
    else:
        member.role = role.value
        for key in await repo.keys_in(uow.session, project, owner=subject):
            if Role(key.role).rank > role.rank:
                await _revoke(uow, key, project.name, reason="owner's role lowered", now=now)
    await uow.session.flush()
    await _mirrored(
        uow, MemberChanged(project=project.name, member=subject, role=role.value), entity=subject
    )
    await uow.audit(
        "member.put",
        f"project/{project.name}/member/{subject}",
        project=project.name,
        before=before,
        after={"role": role.value},
    )
    return member


async def remove_member(uow: UnitOfWork, project: Project, subject: str, *, now: datetime) -> None:
    """Remove a member; the keys they own in the project stop working with them."""
    member = await repo.member(uow.session, project, subject)
    if member is None:
        raise NotFound(f"{subject!r} is not a member of project {project.name!r}")
    for key in await repo.keys_in(uow.session, project, owner=subject):
        await _revoke(uow, key, project.name, reason="owner removed from project", now=now)
    await uow.session.delete(member)
    await uow.session.flush()
    await _mirrored(
        uow, MemberChanged(project=project.name, member=subject, role=None), entity=subject
    )
    await uow.audit(
        "member.remove",
        f"project/{project.name}/member/{subject}",
        project=project.name,
        before={"role": member.role},
    )


# -- API keys ---------------------------------------------------------------------------------


def key_status(key: ApiKey, now: datetime) -> str:
    """``expired`` from the instant ``expires_at`` is reached."""
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


def key_state(key: ApiKey, project: str | None) -> dict[str, Any]:
    return {
        "key_id": key.id,
        "digest": key.digest,
        "project": project,
        "owner": key.owner,
        "role": key.role,
        "scopes": list(key.scopes),
        "expires_at": key.expires_at,
    }


def _summary(key: ApiKey, now: datetime) -> dict[str, Any]:
    """What the audit log keeps of a key: never the digest or the secret."""
    return {
        "name": key.name,
        "owner": key.owner,
        "role": key.role,
        "scopes": list(key.scopes),
        "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        "status": key_status(key, now),
    }


def _check_scopes(principal: Principal, scopes: Sequence[str]) -> None:
    excess = sorted(set(scopes) - principal.scopes)
    if excess:
        raise Forbidden(f"a key cannot carry scopes its creator lacks: {excess}")


async def _owner_role(uow: UnitOfWork, principal: Principal, project: Project, owner: str) -> Role:
    """The strongest project role a key for ``owner`` may carry, as issued by ``principal``."""
    caller_role = principal.role_in(project.name)
    assert caller_role is not None  # the route's authorisation guarantees a role
    caller_cap = min(caller_role, Role.PROJECT_ADMIN, key=lambda r: r.rank)
    if owner == principal.subject:
        return caller_cap
    if not caller_role.at_least(Role.PROJECT_ADMIN):
        raise Forbidden("only a project-admin may issue keys to other members")
    member = await repo.member(uow.session, project, owner)
    if member is None:
        raise Unprocessable(f"{owner!r} is not a member of project {project.name!r}")
    return min(Role(member.role), caller_cap, key=lambda r: r.rank)


@dataclass(frozen=True)
class IssuedKey:
    key: ApiKey
    project: str | None
    secret: str  # the full key, returned to the caller once


async def _issue(
    uow: UnitOfWork,
    pepper: bytes,
    *,
    project: Project | None,
    name: str,
    owner: str,
    role: Role,
    scopes: Sequence[str],
    expires_at: datetime | None,
    now: datetime,
    full_key: str | None = None,
) -> IssuedKey:
    if full_key is None:
        key_id, full_key = apikeys.generate()
    else:
        parsed = apikeys.key_id_of(full_key)
        if parsed is None:
            raise Unprocessable("the configured key is not of the form stw_<8>_<32> (base62)")
        key_id = parsed
    if await repo.key_with_project(uow.session, key_id) is not None:
        raise Conflict("key id collision; try again")
    key = ApiKey(
        id=key_id,
        digest=apikeys.digest(pepper, full_key),
        name=name,
        project_id=project.id if project else None,
        owner=owner,
        role=role.value,
        scopes=sorted(scopes),
        created_by=uow.actor,
        expires_at=expires_at,
    )
    uow.session.add(key)
    await uow.session.flush()
    project_name = project.name if project else None
    await _mirrored(uow, KeyCreated(**key_state(key, project_name)), entity=key.id)
    await uow.audit("key.create", f"key/{key.id}", project=project_name, after=_summary(key, now))
    return IssuedKey(key=key, project=project_name, secret=full_key)


async def create_project_key(
    uow: UnitOfWork,
    pepper: bytes,
    principal: Principal,
    project: Project,
    *,
    name: str,
    scopes: Sequence[str],
    role: Role | None,
    owner: str | None,
    expires_at: datetime | None,
    now: datetime,
) -> IssuedKey:
    owner = owner or principal.subject
    allowed = await _owner_role(uow, principal, project, owner)
    role = role or allowed
    if role.rank > allowed.rank:
        raise Forbidden(f"the key's role {role.value} exceeds {allowed.value}")
    _check_scopes(principal, scopes)
    return await _issue(
        uow,
        pepper,
        project=project,
        name=name,
        owner=owner,
        role=role,
        scopes=scopes,
        expires_at=expires_at,
        now=now,
    )


async def create_platform_key(
    uow: UnitOfWork,
    pepper: bytes,
    principal: Principal,
    *,
    name: str,
    scopes: Sequence[str],
    expires_at: datetime | None,
    now: datetime,
) -> IssuedKey:
    _check_scopes(principal, scopes)
    return await _issue(
        uow,
        pepper,
        project=None,
        name=name,
        owner=principal.subject,
        role=Role.PLATFORM_ADMIN,
        scopes=scopes,
        expires_at=expires_at,
        now=now,
    )


def may_manage_key(principal: Principal, key: ApiKey, project: str | None) -> bool:
    """Owners manage their keys; project-admins (and platform-admins) manage all of a project's."""
    role = principal.role_in(project)
    if role is None:
        return False
    if key.owner == principal.subject:
        return True
    return role.at_least(Role.PROJECT_ADMIN if project else Role.PLATFORM_ADMIN)


async def find_key(
    uow: UnitOfWork,
    principal: Principal,
    project: Project | None,
    key_id: str,
    *,
    for_update: bool = False,
) -> ApiKey:
    """The key, if the principal may manage it; ``for_update`` locks what a change to it must
    decide on (the key; for a platform key, every platform key)."""
    if for_update and project is None:
        await repo.lock_platform_keys(uow.session)
    found = await repo.key_with_project(uow.session, key_id, for_update=for_update)
    project_id = project.id if project else None
    # A key of another project reads as absent: no hint that it exists.
    if found is None or found[0].project_id != project_id:
        raise NotFound(f"no key {key_id!r} here")
    key = found[0]
    if not may_manage_key(principal, key, project.name if project else None):
        raise Forbidden("only the key's owner or a project-admin may manage it")
    return key


async def _revoke(
    uow: UnitOfWork, key: ApiKey, project: str | None, *, reason: str, now: datetime
) -> None:
    before = _summary(key, now)
    key.revoked_at = now
    await uow.session.flush()
    await _mirrored(uow, KeyRevoked(key_id=key.id, project=project), entity=key.id)
    await uow.audit(
        "key.revoke",
        f"key/{key.id}",
        project=project,
        before=before,
        after={**_summary(key, now), "reason": reason},
    )


def is_admin_credential(key: ApiKey, now: datetime) -> bool:
    """An active platform key of a person that can manage keys: what lets a person back in.
    Service keys (the gateway's, inference's) are not a way in for anyone."""
    return (
        key.project_id is None
        and key.owner not in SERVICE_OWNERS
        and "keys:manage" in key.scopes
        and key_status(key, now) == "active"
    )


def is_service_key(key: ApiKey) -> bool:
    """A key a Steward service runs with (configured in its deployment, installed at start)."""
    return key.project_id is None and key.owner in SERVICE_OWNERS


def _protect_service_key(key: ApiKey, what: str, force: bool) -> None:
    if is_service_key(key) and not force:
        service = key.owner.removeprefix("steward-")
        raise Conflict(
            f"key {key.id} is the {service} service's key: {what} it here cuts the {service} "
            f"off until its deployment has a new one. Replace STEWARD_{service.upper()}_API_KEY "
            "and restart it (the new key is installed at start); or, for a leaked key, "
            "force=true"
        )


async def revoke_key(
    uow: UnitOfWork, key: ApiKey, project: str | None, *, now: datetime, force: bool = False
) -> ApiKey:
    """Revoke (idempotent). The last admin credential stays, whoever asks, itself included: with
    it gone nobody could manage keys again. A service's key is revoked only with ``force`` (an
    incident), not by a slip beside user keys. Platform keys must have been found
    ``for_update``."""
    if key.revoked_at is not None:
        return key
    _protect_service_key(key, "revoking", force)
    if is_admin_credential(key, now):
        others = await repo.keys_in(uow.session, None)
        if not any(k.id != key.id and is_admin_credential(k, now) for k in others):
            raise Conflict(
                f"key {key.id} is the last active platform-admin key that can manage keys; "
                "create another first (or, on the host, `steward admin recover`)"
            )
    await _revoke(uow, key, project, reason="revoked by " + uow.actor, now=now)
    return key


async def rotate_key(
    uow: UnitOfWork,
    pepper: bytes,
    key: ApiKey,
    project: Project | None,
    grace: timedelta,
    *,
    now: datetime,
) -> IssuedKey:
    """A new key with the same grants; the old one keeps working for the grace period. A
    service's key is rotated in its deployment (its new secret installed at start)."""
    _protect_service_key(key, "rotating", False)
    status = key_status(key, now)
    if status != "active":
        raise Conflict(f"key {key.id} is {status}; only an active key can be rotated")
    if key.rotated_to is not None:
        raise Conflict(f"key {key.id} was already rotated to {key.rotated_to}")
    issued = await _issue(
        uow,
        pepper,
        project=project,
        name=key.name,
        owner=key.owner,
        role=Role(key.role),
        scopes=key.scopes,
        expires_at=key.expires_at,
        now=now,
    )
    before = _summary(key, now)
    grace_end = now + grace
    key.expires_at = min(key.expires_at, grace_end) if key.expires_at else grace_end
    key.rotated_to = issued.key.id
    await uow.session.flush()
    await _mirrored(uow, KeyUpdated(**key_state(key, issued.project)), entity=key.id)
    await uow.audit(
        "key.rotate",
        f"key/{key.id}",
        project=issued.project,
        before=before,
        after={**_summary(key, now), "rotated_to": issued.key.id},
    )
    return issued


# -- entitlements -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolLimits:
    """How much of an MCP server a grant covers (both None: all of it)."""

    tool_access: Sequence[str] | None = None
    tools: Sequence[str] | None = None

    def stored(self) -> dict[str, list[str] | None]:
        return {
            "tool_access": sorted(set(self.tool_access)) if self.tool_access else None,
            "tools": sorted(set(self.tools)) if self.tools else None,
        }


async def grant_entitlement(
    uow: UnitOfWork,
    project: Project,
    kind: str,
    name: str,
    reason: str,
    limits: ToolLimits = ToolLimits(),
) -> tuple[Entitlement, bool]:
    """Grant, or change what a grant covers. Idempotent: granting what is already granted, as
    it is, changes nothing (and returns False). Returns whether the grant is new."""
    wanted = limits.stored()
    try:
        check_tool_limits(kind, wanted["tool_access"], wanted["tools"])
    except ValueError as exc:
        raise Unprocessable(str(exc)) from None
    existing = await repo.entitlement(uow.session, project, kind, name, for_update=True)
    before = None
    if existing is not None:
        held = {"tool_access": existing.tool_access, "tools": existing.tools}
        if held == wanted:
            return existing, False
        before = held
        entitlement = existing
        entitlement.tool_access, entitlement.tools = wanted["tool_access"], wanted["tools"]
    else:
        entitlement = Entitlement(
            project_id=project.id,
            asset_kind=kind,
            asset_name=name,
            granted_by=uow.actor,
            reason=reason,
            **wanted,
        )
        uow.session.add(entitlement)
    await uow.session.flush()
    await _mirrored(uow, _granted(project, entitlement), entity=f"{project.name}/{kind}/{name}")
    await uow.audit(
        "entitlement.grant" if before is None else "entitlement.change",
        f"project/{project.name}/entitlement/{kind}/{name}",
        project=project.name,
        before=before,
        after={"reason": reason, **wanted},
    )
    return entitlement, before is None


def _granted(project: Project, e: Entitlement) -> EntitlementGranted:
    return EntitlementGranted(
        project=project.name,
        asset_kind=e.asset_kind,
        asset_name=e.asset_name,
        tool_access=e.tool_access,
        tools=e.tools,
        fallbacks=e.fallbacks,
    )


async def set_fallbacks(
    uow: UnitOfWork, project: Project, model: str, chain: Sequence[str]
) -> Entitlement:
    """The project's fallback chain for a model it is entitled to (empty: none). The chain
    names gateway models; whether each may serve is decided at the call (entitled, approved)."""
    if model in chain:
        raise Unprocessable(f"chain: {model!r} cannot fall back to itself")
    if len(set(chain)) != len(chain):
        raise Unprocessable("chain: a model appears twice")
    entitlement = await repo.entitlement(uow.session, project, "model", model, for_update=True)
    if entitlement is None:
        raise NotFound(f"project {project.name!r} is not entitled to the model {model!r}")
    wanted = list(chain) or None
    before = entitlement.fallbacks
    if before == wanted:
        return entitlement
    entitlement.fallbacks = wanted
    await uow.session.flush()
    await _mirrored(uow, _granted(project, entitlement), entity=f"{project.name}/model/{model}")
    await uow.audit(
        "entitlement.fallbacks",
        f"project/{project.name}/entitlement/model/{model}",
        project=project.name,
        before={"fallbacks": before},
        after={"fallbacks": wanted},
    )
    return entitlement


async def revoke_entitlement(uow: UnitOfWork, project: Project, kind: str, name: str) -> None:
    entitlement = await repo.entitlement(uow.session, project, kind, name)
    if entitlement is None:
        raise NotFound(f"project {project.name!r} holds no entitlement to {kind} {name!r}")
    await uow.session.delete(entitlement)
    await uow.session.flush()
    await _mirrored(
        uow,
        EntitlementRevoked(project=project.name, asset_kind=kind, asset_name=name),
        entity=f"{project.name}/{kind}/{name}",
    )
    await uow.audit(
        "entitlement.revoke",
        f"project/{project.name}/entitlement/{kind}/{name}",
        project=project.name,
        before={"reason": entitlement.reason, "granted_by": entitlement.granted_by},
    )


# -- bootstrap --------------------------------------------------------------------------------

# The platform keys Steward's own processes use, and the least they need. The operator provides
# each key (Helm/compose Secrets); bootstrap installs it once.
SERVICE_KEY_SCOPES: dict[str, tuple[str, ...]] = {
    # snapshots of keys, catalog versions, routes and quotas for the gateway's replicas; it can
    # read them, not change anything (whoever holds the gateway's key cannot mint keys)
    "gateway": ("snapshots:read",),
    # the catalog version's source when an approval provisions an endpoint
    "inference": ("catalog:read",),
}
SERVICE_OWNERS = frozenset(f"steward-{service}" for service in SERVICE_KEY_SCOPES)


async def install_service_key(
    uow: UnitOfWork, pepper: bytes, service: str, full_key: str, *, now: datetime
) -> bool:
    """Install a configured service key as a platform key; True when it was new.

    Idempotent: the same key twice changes nothing. A different key under the same id is refused
    (two operators' secrets collided, or the key was edited).
    """
    key_id = apikeys.key_id_of(full_key)
    if key_id is None:
        raise Unprocessable(f"the {service} key is not of the form stw_<8>_<32> (base62)")
    found = await repo.key_with_project(uow.session, key_id, for_update=True)
    if found is not None:
        key = found[0]
        if not apikeys.matches(pepper, full_key, key.digest):
            raise Conflict(f"another key already has the id of the configured {service} key")
        await _narrow(uow, key, SERVICE_KEY_SCOPES[service], now=now)
        return False
    await _issue(
        uow,
        pepper,
        project=None,
        name=service,
        owner=f"steward-{service}",
        role=Role.PLATFORM_ADMIN,
        scopes=SERVICE_KEY_SCOPES[service],
        expires_at=None,
        now=now,
        full_key=full_key,
    )
    return True


async def _narrow(uow: UnitOfWork, key: ApiKey, scopes: Sequence[str], *, now: datetime) -> None:
    """A service key installed by an earlier release keeps only what its service needs now."""
    if sorted(key.scopes) == sorted(scopes):
        return
    before = _summary(key, now)
    key.scopes = sorted(scopes)
    await uow.session.flush()
    await _mirrored(uow, KeyUpdated(**key_state(key, None)), entity=key.id)
    await uow.audit("key.update", f"key/{key.id}", before=before, after=_summary(key, now))


async def bootstrap(
    uow: UnitOfWork, pepper: bytes, configured_key: str | None, *, now: datetime
) -> IssuedKey | None:
    """On the very first start: the platform admin and a platform key with every scope.

    Returns the issued key (whose secret the caller shows once), or None when the installation
    already has a platform admin.
    """
    if await repo.any_platform_admin(uow.session):
        return None
    uow.session.add(PlatformAdmin(subject=BOOTSTRAP_ADMIN))
    await uow.session.flush()
    await uow.audit("platform_admin.create", f"platform_admin/{BOOTSTRAP_ADMIN}")
    return await _issue(
        uow,
        pepper,
        project=None,
        name="bootstrap",
        owner=BOOTSTRAP_ADMIN,
        role=Role.PLATFORM_ADMIN,
        scopes=sorted(SCOPES),
        expires_at=None,
        now=now,
        full_key=configured_key,
    )


async def recover(uow: UnitOfWork, pepper: bytes, owner: str, *, now: datetime) -> IssuedKey:
    """Break-glass: a new platform key with every scope, for someone who holds the database (not
    the API) after every admin credential was lost. Audited like any key, and as a recovery."""
    issued = await _issue(
        uow,
        pepper,
        project=None,
        name="recovered",
        owner=owner,
        role=Role.PLATFORM_ADMIN,
        scopes=sorted(SCOPES),
        expires_at=None,
        now=now,
    )
    await uow.audit(
        "platform_key.recover", f"key/{issued.key.id}", after={"owner": owner, "by": uow.actor}
    )
    return issued
