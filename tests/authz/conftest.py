"""Fixtures for authz: a real identity provider, and authz instances trusting it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from libs.common.settings import Settings
from tests.authz.oidc_issuer import Issuer, SigningKey, new_key
from tests.conftest import running
from tests.helpers import serve


@pytest.fixture(scope="module")
async def issuer() -> AsyncIterator[Issuer]:
    idp = Issuer()
    async with serve(idp.app()) as url:
        idp.base_url = url
        yield idp


@pytest.fixture(scope="module")
def rsa_key(issuer: Issuer) -> SigningKey:
    return issuer.add(new_key("rsa-1"))


async def authz_trusting(settings: Settings, **oidc: object) -> AsyncIterator[httpx.AsyncClient]:
    from services.authz.app import create_app

    configured = settings.model_copy(update=oidc)
    app: FastAPI
    async for app in running(create_app(configured)):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://authz") as client:
            yield client


@pytest.fixture(scope="module")
async def oidc_authz(
    settings: Settings, issuer: Issuer, rsa_key: SigningKey
) -> AsyncIterator[httpx.AsyncClient]:
    async for client in authz_trusting(
        settings, oidc_issuer=issuer.issuer, oidc_audience="steward"
    ):
        yield client
