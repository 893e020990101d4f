"""Events published by the inference service about endpoints, and the sealed upstream credential.

Every ``inference.endpoint.*`` event carries the endpoint's full routable state, so the gateway
can apply any of them without calling back. The rule for a route table is one line: **route the
endpoint iff the latest event about it has ``status == "ready"``**; anything else (provisioning
again after a crash, failed, stopped, deleting, deleted) removes the route. Events about one
endpoint are published in order; ``GET /v1/routes`` on the inference service is the snapshot to
start from.

An ``external`` endpoint's upstream credential never travels or rests in plaintext: it is a
Fernet token (``cryptography.fernet``) under ``Settings().upstream_credential_fernet_key``,
derived from the secret in ``STEWARD_UPSTREAM_CREDENTIAL_KEY`` that the inference service and
the gateway share. The gateway calls ``open_credential(settings.upstream_credential_fernet_key,
event.upstream_credential)`` just before it sends ``Authorization: Bearer`` upstream.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import ClassVar, Literal

from cryptography.fernet import Fernet, InvalidToken

from libs.common.events.envelope import EventPayload

EndpointStatus = Literal["provisioning", "ready", "failed", "stopped", "deleting", "deleted"]
RuntimeName = Literal["kubernetes", "local", "external"]
# Statuses in which an endpoint holds its GPUs: the inference service's pool counts them as used,
# and metering bills GPU-hours for them. Not ``deleting``, nor ``failed``: from the moment an
# endpoint is being torn down or has failed, it holds nothing and costs nothing, however long the
# runtime's cleanup takes (it retries in the background).
HOLDS_GPUS: tuple[EndpointStatus, ...] = ("provisioning", "ready")


class EndpointState(EventPayload):
    """What a router needs to know about one endpoint, as of this event."""

    endpoint_id: str
    project: str
    status: EndpointStatus
    # The public model name clients send in ``"model"`` at the gateway; unique among live
    # endpoints.
    route_name: str
    # The name the upstream server knows the model by (vLLM ``--served-model-name``).
    served_model_name: str
    asset_kind: Literal["model", "mcp_server"] = "model"
    asset_name: str
    version: str
    runtime: RuntimeName
    # The OpenAI-compatible base URL (ends in ``/v1``); None until the runtime reports one.
    upstream_url: str | None
    # Every serving replica's base URL, when the gateway balances them (the local runtime's
    # replicas); empty: ``upstream_url`` alone (one URL, balanced behind it if at all).
    upstream_urls: list[str] = []
    # Fernet token of the upstream's bearer credential (``external`` endpoints only).
    upstream_credential: str | None = None
    network_exposure: Literal["project", "internal", "public"] = "project"
    replicas: int
    gpus: int
    gpu_type: str | None
    reason: str = ""
    request_id: str | None = None
    changed_at: datetime


class EndpointProvisioning(EndpointState):
    """Being created, scaled up from stopped, or restarting after a crash: no route."""

    subject: ClassVar[str] = "inference.endpoint.provisioning"


class EndpointReady(EndpointState):
    """Serving at ``upstream_url``: add (or update) the route."""

    subject: ClassVar[str] = "inference.endpoint.ready"


class EndpointFailed(EndpointState):
    """Could not be provisioned or kept alive; ``reason`` says why. No route."""

    subject: ClassVar[str] = "inference.endpoint.failed"


class EndpointStopped(EndpointState):
    """Scaled to zero by its owners (GPUs released); it may be started again. No route."""

    subject: ClassVar[str] = "inference.endpoint.stopped"


class EndpointDeleting(EndpointState):
    """Being torn down (by a person, or because its version or entitlement was revoked)."""

    subject: ClassVar[str] = "inference.endpoint.deleting"


class EndpointDeleted(EndpointState):
    """Gone from its runtime; the record stays for the audit trail and lead-time statistics."""

    subject: ClassVar[str] = "inference.endpoint.deleted"


EVENTS_BY_STATUS: dict[str, type[EndpointState]] = {
    "provisioning": EndpointProvisioning,
    "ready": EndpointReady,
    "failed": EndpointFailed,
    "stopped": EndpointStopped,
    "deleting": EndpointDeleting,
    "deleted": EndpointDeleted,
}


class CredentialError(Exception):
    """A sealed credential could not be opened (wrong key, or tampered with)."""


def seal_credential(key: bytes, secret: str) -> str:
    """Encrypt an upstream credential for storage and transport (authenticated, timestamped)."""
    return Fernet(key).encrypt(secret.encode()).decode("ascii")


def open_credential(key: bytes, token: str) -> str:
    """The plaintext credential, for the moment it is sent upstream; never log or store it."""
    try:
        return Fernet(key).decrypt(token.encode("ascii")).decode()
    except (InvalidToken, ValueError) as exc:
        raise CredentialError("the upstream credential cannot be opened with this key") from exc


def seal_environment(key: bytes, values: Mapping[str, str]) -> str | None:
    """An MCP server's environment variables as one sealed token (None when there are none)."""
    return seal_credential(key, json.dumps(dict(values), sort_keys=True)) if values else None


def open_environment(key: bytes, token: str) -> dict[str, str]:
    """The variables of ``seal_environment``, for the server's process alone."""
    try:
        values = json.loads(open_credential(key, token))
    except ValueError as exc:
        raise CredentialError("the environment is not what seal_environment made") from exc
    return {str(k): str(v) for k, v in values.items()}
