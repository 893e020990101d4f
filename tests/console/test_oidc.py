"""Single sign-on in Chromium: the console runs the authorization-code flow with PKCE (S256)
against an OIDC issuer from its config.json, checks the state, and exchanges the code at the
token endpoint named by the issuer's discovery document.

The issuer here is a small stand-in that checks what a real one checks (the verifier against the
challenge, the redirect URI, the client); authz does not trust it, so the last step — whoami with
its token — is refused, which the console reports."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from playwright.async_api import expect
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.console.conftest import CONSOLE, Stack
from tests.console.support import console_page
from tests.helpers import free_port, serve

CORS = {"Access-Control-Allow-Origin": "*"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class Issuer:
    def __init__(self, url: str) -> None:
        self.url = url
        self.authorize: dict[str, str] = {}
        self.token: dict[str, str] = {}
        self.exchanged = False

    def app(self) -> Starlette:
        async def discovery(request: Request) -> Response:
            return JSONResponse(
                {
                    "issuer": self.url,
                    "authorization_endpoint": f"{self.url}/authorize",
                    "token_endpoint": f"{self.url}/token",
                    "code_challenge_methods_supported": ["S256"],
                },
                headers=CORS,
            )

        async def authorize(request: Request) -> Response:
            self.authorize = dict(request.query_params)
            query = urlencode({"code": "the-code", "state": self.authorize["state"]})
            return RedirectResponse(f"{self.authorize['redirect_uri']}?{query}", status_code=302)

        async def token(request: Request) -> Response:
            self.token = {k: str(v) for k, v in (await request.form()).items()}
            challenge = b64url(hashlib.sha256(self.token["code_verifier"].encode()).digest())
            if (
                self.token["grant_type"] != "authorization_code"
                or self.token["code"] != "the-code"
                or self.token["redirect_uri"] != self.authorize["redirect_uri"]
                or self.token["client_id"] != self.authorize["client_id"]
                or challenge != self.authorize["code_challenge"]
            ):
                return JSONResponse({"error": "invalid_grant"}, status_code=400, headers=CORS)
            self.exchanged = True
            claims = b64url(json.dumps({"nonce": self.authorize["nonce"]}).encode())
            return JSONResponse(
                {
                    "access_token": "not-a-token-authz-trusts",
                    "token_type": "Bearer",
                    "expires_in": 300,
                    "id_token": f"{b64url(b'{}')}.{claims}.",
                },
                headers=CORS,
            )

        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", discovery),
                Route("/authorize", authorize),
                Route("/token", token, methods=["POST"]),
            ]
        )


@pytest.fixture(scope="module")
async def sso(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Issuer, str]]:
    from gateway.app import Gateway, ProxyApp

    port = free_port()
    issuer = Issuer(f"http://127.0.0.1:{port}")
    console_dir = tmp_path_factory.mktemp("console-sso") / "console"
    shutil.copytree(CONSOLE, console_dir)
    config = {"oidc": {"issuer": issuer.url, "client_id": "steward-console", "label": "SSO"}}
    (console_dir / "config.json").write_text(json.dumps(config))
    settings = stack.settings.model_copy(
        update={
            "gateway_console_dir": console_dir,
            "data_dir": tmp_path_factory.mktemp("console-sso-gateway"),
        }
    )
    async with contextlib.AsyncExitStack() as exits:
        await exits.enter_async_context(serve(issuer.app(), port))
        gateway = await Gateway.start(settings)
        exits.push_async_callback(gateway.stop)
        await gateway.wait_loaded(10)
        url = await exits.enter_async_context(serve(ProxyApp(gateway)))
        yield issuer, url


async def test_sso_runs_the_code_flow_with_pkce_and_checks_the_state(
    browser: Any, sso: tuple[Issuer, str], artifacts: Path
) -> None:
    issuer, url = sso
    console = await console_page(browser, url, artifacts)
    page = console.page
    await console.open()
    await page.get_by_role("button", name="SSO").click()
    # Back from the issuer: the code is exchanged, then whoami refuses the stand-in's token.
    await expect(page.get_by_role("alert")).to_contain_text("Sign-in failed")
    assert issuer.exchanged
    sent = issuer.authorize
    assert sent["response_type"] == "code"
    assert sent["code_challenge_method"] == "S256"
    assert sent["redirect_uri"] == f"{url}/console/"
    assert len(sent["state"]) >= 32 and len(sent["nonce"]) >= 32
    assert 43 <= len(issuer.token["code_verifier"]) <= 128
    assert "code=" not in page.url, "the code leaves the address bar"
    assert await page.evaluate("() => window.sessionStorage.length") == 0
    assert await page.evaluate("() => window.localStorage.length") == 0

    # A response this tab did not ask for (wrong state) is refused before any exchange.
    issuer.exchanged = False
    await page.goto(f"{url}/console/?code=the-code&state=forged")
    await expect(page.get_by_role("alert")).to_contain_text("state mismatch")
    assert not issuer.exchanged
    console.assert_clean()
