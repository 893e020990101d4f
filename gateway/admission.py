"""Admission: may this caller use this model or MCP server, and does its quota hold the call?

One sequence for every area that serves catalog assets (``/v1``, ``/mcp``): the credential (API
key or OIDC token) and the project it acts for, the role and scope for the action, the project's
entitlement to the asset, an approved catalog version of it. Kong routes bring their own
authentication (their plugins) and share the quota hold. A refusal is one type, ``Refusal``,
which each area renders in its own dialect (an OpenAI error object, a JSON-RPC error, Kong's
``{"message": …}``).

A call's quota hold is settled by the call's exchange (gateway/exchange.py), a context manager:
whichever way the call ends, leaving it settles the hold and records the usage together.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from starlette.types import Scope

from gateway.authn import Authenticator, AuthFailure, project_of
from gateway.http import Headers, openai_error
from gateway.quota import QuotaLedger, Reservation, client_headers
from gateway.replica import AuthReplica, CatalogReplica
from libs.common.auth import Principal, decide
from libs.common.events.catalog import VersionState

# JSON-RPC error codes: the reserved "server error" range for gateway refusals.
REFUSED = -32001
INVALID_REQUEST = -32600

# The OpenAI error type of each status the gateway answers itself.
_OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "insufficient_quota",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout",
}


def rpc_error(message: str, code: int = REFUSED, id_: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "error": {"code": code, "message": message}}


class Refusal(Exception):
    """A request the gateway answers itself. ``code`` is the machine-readable reason (also the
    usage event's ``error_type``); ``message`` is safe to show the caller, and is a mapping only
    where Kong answers with one (the jwt plugin's claim errors)."""

    def __init__(
        self,
        status: int,
        message: str | Mapping[str, Any],
        code: str | None = None,
        *,
        param: str | None = None,
        headers: Headers | Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(str(message))
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers: Headers = (
            [(k.lower().encode(), v.encode()) for k, v in headers.items()]
            if isinstance(headers, Mapping)
            else list(headers or ())
        )

    @property
    def reason(self) -> str:
        return self.code or self.openai_type

    @property
    def openai_type(self) -> str:
        return _OPENAI_TYPES.get(self.status, "invalid_request_error")

    def openai(self) -> dict[str, Any]:
        return openai_error(str(self.message), self.openai_type, code=self.code, param=self.param)

    def jsonrpc(self, id_: Any = None) -> dict[str, Any]:
        code = INVALID_REQUEST if self.status == 400 else REFUSED
        return rpc_error(str(self.message), code, id_)

    def kong(self) -> bytes:
        message = self.message
        return json.dumps(
            message if isinstance(message, Mapping) else {"message": message}
        ).encode()


@dataclass(frozen=True, slots=True)
class Admitted:
    principal: Principal
    project: str  # the project the call is made for (billing, entitlements, quotas)


Action = Literal["inference.invoke", "mcp.invoke"]
AssetKind = Literal["model", "mcp_server"]


class Admission:
    def __init__(
        self,
        authn: Authenticator,
        auth: AuthReplica,
        catalog: CatalogReplica,
        quota: QuotaLedger,
    ) -> None:
        self.authn = authn
        self.auth = auth
        self.catalog = catalog
        self.quota = quota

    async def identify(self, scope: Scope) -> Admitted:
        """Who calls, and for which project."""
        try:
            principal = await self.authn.principal(scope)
            return Admitted(principal, project_of(principal, scope))
        except AuthFailure as failure:
            raise Refusal(failure.status, failure.message, failure.code) from None

    async def caller(self, scope: Scope, action: Action) -> Admitted:
        """Who calls, for which project, and may they take ``action`` in it."""
        who = await self.identify(scope)
        decision = decide(who.principal, action, who.project)
        if not decision.allowed:
            raise Refusal(403, decision.reason, "forbidden")
        return who

    def offered(self, project: str, kind: AssetKind, asset: str, pinned: str | None) -> bool:
        """Entitled and approved: what a listing shows the project (no refusal built)."""
        return self.auth.entitled(project, kind, asset) and (
            self.catalog.approved(kind, asset, pinned) is not None
        )

    def version(
        self, project: str, kind: AssetKind, asset: str, pinned: str | None, what: str
    ) -> VersionState:
        """The approved catalog version the project may call (``pinned``, else the newest
        approved); ``what`` names the asset in refusals ("the model 'x'")."""
        if not self.auth.entitled(project, kind, asset):
            raise Refusal(403, f"project '{project}' is not entitled to {what}", "not_entitled")
        if not self.catalog.loaded:
            raise Refusal(503, "the catalog replica is not loaded yet", "unavailable")
        version = self.catalog.approved(kind, asset, pinned)
        if version is None:
            raise Refusal(403, f"{what} has no approved catalog version", "not_approved")
        return version

    def reserve(
        self,
        *,
        project: str,
        credential_id: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        requests: int = 1,
    ) -> Reservation:
        """Hold the estimate of ``requests`` calls against the project's quotas (429 when one
        would not hold it). The caller settles it whichever way the calls end (for a model call,
        gateway/exchange.py does)."""
        reservation = self.quota.reserve(
            project=project,
            credential_id=credential_id,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            requests=requests,
        )
        if not reservation.allowed:
            raise Refusal(
                429,
                reservation.reason or "quota exceeded",
                "quota_exceeded",
                headers=client_headers(reservation),
            )
        return reservation
