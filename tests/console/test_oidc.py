"""Single sign-on in Chromium, end to end: the console runs the authorization-code flow with PKCE
(S256) against an OIDC issuer from its config.json, checks the state, exchanges the code at the
token endpoint named by the issuer's discovery document, and ends signed in, because authz
verifies the access token (a JWT signed with a key from the issuer's JWKS) and maps its claims.

The issuer is small but real: discovery, a JWKS with an RSA key made here, and a token endpoint
that checks what a real one checks (the code, the verifier against the challenge, the redirect
URI, the client) before it signs the tokens with tests/authz's helpers (``oidc_issuer``).

Who trusts it, and why this way. The gateway does not verify tokens on ``/api``: it passes the
credential through and every service asks authz (``RemoteResolver`` → ``/v1/whoami``). So what
must trust the issuer is authz, and every service the console calls must ask *that* authz: one
401 anywhere makes the console sign out (api.js), so an authz that trusts the issuer behind
catalog and approval that ask another one would not behave like a deployment. The session's
services were started without an issuer and are not reconfigured behind their backs; instead this
module starts its own authz (trusting the issuer), catalog and approval (asking that authz), and a
gateway in front of them (also trusting the issuer, as a deployment's would for ``/v1``). They
share the session's database and NATS namespace, so they are replicas of the session's services
— and they run **no event consumers** (their specs with ``handlers={}``): a second subscriber on
the same durable would take approval events away from the session's services, and an instance
stopped at the end of this module could leave a fetched message unacknowledged for the others.
What they do run is replica-safe by design: the outbox relay and approval's expiry both claim
rows with ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode

import httpx
import pytest
from fastapi import FastAPI
from playwright.async_api import expect
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from libs.common.service import ServiceSpec, create_service_app
from libs.common.settings import Settings
from tests.authz.oidc_issuer import Issuer, SigningKey, new_key
from tests.conftest import running
from tests.console.conftest import CONSOLE, Stack
from tests.console.support import Console, console_page
from tests.helpers import add_member, free_port, new_project, serve, unique

CORS = {"Access-Control-Allow-Origin": "*"}
CLIENT_ID = "steward-console"
AUDIENCE = "steward"  # what Steward's authz checks as ``aud`` (STEWARD_OIDC_AUDIENCE)
FOREIGN_ISSUER = "https://idp.example.org/realms/elsewhere"
Forgery = Literal["foreign-key", "foreign-issuer"]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class ConsoleIssuer:
    """The browser-facing half of an issuer (discovery, authorize, token, with CORS for the
    console's fetches) over tests/authz's signing half (keys, JWKS, minted JWTs)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.idp = Issuer(base_url=url)
        self.key = self.idp.add(new_key("console-rsa-1"))
        # The access token's claims beyond iss/aud/iat/nbf/exp (sub, scope, groups…).
        self.claims: dict[str, Any] = {}
        # None: tokens as the issuer signs them; otherwise how to forge the next ones.
        self.forgery: Forgery | None = None
        self.codes: set[str] = set()
        self.authorize: dict[str, str] = {}
        self.token: dict[str, str] = {}
        self.exchanged = False
        self.issued: str | None = None

    def access_token(self) -> str:
        key, issuer = self.key, self.url
        if self.forgery == "foreign-key":
            # Same kid, same algorithm, another private key: only the signature gives it away.
            key = SigningKey(self.key.kid, self.key.alg, new_key(self.key.kid).private)
        elif self.forgery == "foreign-issuer":
            issuer = FOREIGN_ISSUER
        return self.idp.token(key, issuer=issuer, audience=AUDIENCE, **self.claims)

    def app(self) -> Starlette:
        async def discovery(request: Request) -> Response:
            return JSONResponse(
                {
                    "issuer": self.url,
                    "authorization_endpoint": f"{self.url}/authorize",
                    "token_endpoint": f"{self.url}/token",
                    "jwks_uri": f"{self.url}/jwks",
                    "response_types_supported": ["code"],
                    "grant_types_supported": ["authorization_code"],
                    "code_challenge_methods_supported": ["S256"],
                    "id_token_signing_alg_values_supported": [self.key.alg],
                },
                headers=CORS,
            )

        async def jwks(request: Request) -> Response:
            self.idp.jwks_hits += 1
            return JSONResponse({"keys": [k.jwk() for k in self.idp.keys.values()]})

        async def authorize(request: Request) -> Response:
            self.authorize = dict(request.query_params)
            code = secrets.token_urlsafe(16)
            self.codes.add(code)
            query = urlencode({"code": code, "state": self.authorize["state"]})
            return RedirectResponse(f"{self.authorize['redirect_uri']}?{query}", status_code=302)

        async def token(request: Request) -> Response:
            self.token = {k: str(v) for k, v in (await request.form()).items()}
            challenge = b64url(hashlib.sha256(self.token["code_verifier"].encode()).digest())
            code = self.token["code"]
            if (
                self.token["grant_type"] != "authorization_code"
                or code not in self.codes
                or self.token["redirect_uri"] != self.authorize["redirect_uri"]
                or self.token["client_id"] != self.authorize["client_id"]
                or challenge != self.authorize["code_challenge"]
            ):
                return JSONResponse({"error": "invalid_grant"}, status_code=400, headers=CORS)
            self.codes.discard(code)  # one use
            self.exchanged = True
            self.issued = self.access_token()
            id_token = self.idp.token(
                self.key,
                audience=self.token["client_id"],
                sub=self.claims.get("sub", "user-1"),
                nonce=self.authorize["nonce"],
            )
            return JSONResponse(
                {
                    "access_token": self.issued,
                    "token_type": "Bearer",
                    "expires_in": 300,
                    "id_token": id_token,
                    "scope": self.claims.get("scope", ""),
                },
                headers={**CORS, "Cache-Control": "no-store"},
            )

        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", discovery),
                Route("/jwks", jwks),
                Route("/authorize", authorize),
                Route("/token", token, methods=["POST"]),
            ]
        )


@dataclass
class SSO:
    issuer: ConsoleIssuer
    url: str  # the gateway in front of the services that trust the issuer
    subject: str
    project: str
    colleague: str  # a member of the project, listed on its page


@contextlib.asynccontextmanager
async def replica(
    spec: ServiceSpec,
    settings: Settings,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
) -> AsyncIterator[FastAPI]:
    """The service, without its event consumers (see the module docstring)."""
    app = create_service_app(
        dataclasses.replace(spec, handlers={}), settings, transports=transports
    )
    async with contextlib.asynccontextmanager(running)(app) as started:
        yield started


@pytest.fixture(scope="module")
async def sso(
    stack: Stack,
    settings: Settings,
    authz: httpx.AsyncClient,
    admin_key: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[SSO]:
    from gateway.app import ProxyApp
    from gateway.state import Gateway
    from services.approval.app import SPEC as APPROVAL
    from services.authz.app import SPEC as AUTHZ
    from services.catalog.app import SPEC as CATALOG

    port = free_port()
    issuer = ConsoleIssuer(f"http://127.0.0.1:{port}")
    project = await new_project(authz, admin_key, "sso")
    colleague = unique("colleague")
    await add_member(authz, admin_key, project, colleague, "viewer")
    subject = unique("sso-user")
    issuer.claims = {
        "sub": subject,
        "jti": unique("jti"),
        "scope": "openid profile projects:read keys:manage catalog:read requests:write",
        # The identity provider carries the project role (``/steward/<project>/<role>``).
        "groups": [f"/steward/{project}/project-admin", "/unrelated/group"],
    }
    console_dir = tmp_path_factory.mktemp("console-sso") / "console"
    shutil.copytree(CONSOLE, console_dir)
    config = {"oidc": {"issuer": issuer.url, "client_id": CLIENT_ID, "label": "SSO"}}
    (console_dir / "config.json").write_text(json.dumps(config))
    trust = {"oidc_issuer": issuer.url, "oidc_audience": AUDIENCE}
    trusting = settings.model_copy(update=trust)
    async with contextlib.AsyncExitStack() as exits:
        await exits.enter_async_context(serve(issuer.app(), port))
        authz_app = await exits.enter_async_context(replica(AUTHZ, trusting))
        to_authz = {"authz": httpx.ASGITransport(app=authz_app)}
        catalog_app = await exits.enter_async_context(replica(CATALOG, trusting, to_authz))
        to_both = {**to_authz, "catalog": httpx.ASGITransport(app=catalog_app)}
        approval_app = await exits.enter_async_context(replica(APPROVAL, trusting, to_both))
        # Inference and metering stay on the stack's closed port: their probes answer 502, which
        # the console shows without signing out (a 401 there would sign it out).
        gateway_settings = stack.settings.model_copy(
            update={
                **trust,
                "authz_url": await exits.enter_async_context(serve(authz_app)),
                "catalog_url": await exits.enter_async_context(serve(catalog_app)),
                "approval_url": await exits.enter_async_context(serve(approval_app)),
                "gateway_console_dir": console_dir,
                "data_dir": tmp_path_factory.mktemp("console-sso-gateway"),
            }
        )
        gateway = await Gateway.start(gateway_settings)
        exits.push_async_callback(gateway.stop)
        await gateway.wait_loaded(10)
        url = await exits.enter_async_context(serve(ProxyApp(gateway)))
        yield SSO(issuer, url, subject, project, colleague)


async def sign_in_with_sso(console: Console) -> None:
    await console.open()
    await console.page.get_by_role("button", name="SSO").click()


async def test_sso_signs_in_with_pkce_and_the_issuers_signed_token(
    browser: Any, sso: SSO, artifacts: Path
) -> None:
    issuer = sso.issuer
    console = await console_page(browser, sso.url, artifacts)
    page = console.page
    await sign_in_with_sso(console)

    # Back from the issuer, signed in as the token's subject with the role its groups carry.
    await expect(page.locator("#who-name")).to_have_text(sso.subject)
    await expect(page.locator(".who-role")).to_have_text("project-admin")
    await expect(page.locator(".who-cred")).to_have_text("SSO")
    await expect(page.locator("#project-select")).to_have_value(sso.project)
    await expect(page.locator("main h1")).to_have_text(re.compile("Quick start|Welcome"))
    assert issuer.exchanged and issuer.issued is not None
    assert issuer.idp.jwks_hits >= 1, "authz fetched the issuer's keys to verify the token"
    await console.shot("sso-01-signed-in")

    # The flow: PKCE S256, state and nonce, the registered redirect URI.
    sent = issuer.authorize
    assert sent["response_type"] == "code"
    assert sent["client_id"] == CLIENT_ID
    assert sent["code_challenge_method"] == "S256"
    assert sent["redirect_uri"] == f"{sso.url}/console/"
    assert len(sent["state"]) >= 32 and len(sent["nonce"]) >= 32
    assert 43 <= len(issuer.token["code_verifier"]) <= 128
    assert "code=" not in page.url, "the code leaves the address bar"
    # The access token is kept for this tab only; the pending sign-in (verifier) is gone.
    stored = await page.evaluate("() => window.sessionStorage.getItem('steward.credential')")
    assert json.loads(stored)["kind"] == "oidc"
    assert json.loads(stored)["token"] == issuer.issued
    assert await page.evaluate("() => window.sessionStorage.getItem('steward.oidc')") is None
    assert await page.evaluate("() => window.localStorage.length") == 0

    # Views that call authz and catalog with the token load, and the session holds.
    await console.go("project")
    await expect(page.locator("main h1")).to_have_text(f"Project {sso.project}")
    await expect(page.locator("main table")).to_contain_text(sso.colleague)
    await console.shot("sso-02-project")
    await console.go("catalog")
    await expect(page.locator("main h1")).to_have_text("Catalog")
    await expect(page.locator("#who-name")).to_have_text(sso.subject)
    await expect(page.get_by_role("alert")).to_have_count(0)

    # Sign out, then a response this tab did not ask for (wrong state) is refused before any
    # exchange.
    await page.locator("#sign-out").click()
    await expect(page.get_by_role("alert")).to_contain_text("Signed out of the console")
    assert await page.evaluate("() => window.sessionStorage.length") == 0
    issuer.exchanged = False
    await page.goto(f"{sso.url}/console/?code=forged-code&state=forged")
    await expect(page.get_by_role("alert")).to_contain_text("state mismatch")
    assert not issuer.exchanged
    await expect(page.locator("#who-name")).to_have_count(0)
    console.assert_clean()


@pytest.mark.parametrize(
    ("forgery", "reason"),
    [("foreign-key", "invalid token"), ("foreign-issuer", "wrong issuer")],
)
async def test_sso_token_signed_by_another_key_or_issuer_is_refused(
    browser: Any, sso: SSO, artifacts: Path, forgery: Forgery, reason: str
) -> None:
    issuer = sso.issuer
    issuer.forgery = forgery
    try:
        console = await console_page(browser, sso.url, artifacts)
        page = console.page
        issuer.exchanged = False
        await sign_in_with_sso(console)
        alert = page.get_by_role("alert")
        await expect(alert).to_contain_text("Sign-in failed")
        await expect(alert).to_contain_text(reason)
        assert issuer.exchanged, "the code flow itself succeeded; the token is what is refused"
        await expect(page.locator("#who-name")).to_have_count(0)
        assert await page.evaluate("() => window.sessionStorage.length") == 0
        await console.shot(f"sso-03-refused-{forgery}")
        console.assert_clean()
    finally:
        issuer.forgery = None
