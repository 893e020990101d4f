"""A project's developer calls models through the gateway with the official OpenAI client."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.gateway.conftest import RunningGateway, tenant
from tests.gateway.support import upstream_json


def client(gw: RunningGateway, key: str, **kwargs: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.v1, api_key=key, max_retries=0, **kwargs)  # type: ignore[arg-type]


async def test_openai_client_streams_a_chat_completion_from_an_approved_model(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    oai = client(gw, t.key)
    stream = await oai.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "hello gateway world"}],
        stream=True,
    )
    parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "".join(parts) == "you said: hello gateway world "
    assert len(parts) > 3  # arrived as several chunks, not one buffered blob


async def test_non_streamed_chat_completion_reports_upstream_usage(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    answer = await client(gw, t.key).chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "one two"}]
    )
    assert answer.choices[0].message.content == "you said: one two "
    assert answer.usage is not None and answer.usage.completion_tokens == 4


async def test_models_list_shows_only_entitled_approved_models(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo", "echo-nousage", "unapproved", "uncatalogued"])
    models = await client(gw, t.key).models.list()
    assert sorted(m.id for m in models.data) == ["echo", "echo-nousage"]
    card = await client(gw, t.key).models.retrieve("echo")
    assert card.id == "echo"
    with pytest.raises(openai.NotFoundError):
        await client(gw, t.key).models.retrieve("echo-slow")  # routed, approved, not entitled


async def test_unentitled_model_is_refused_with_an_openai_permission_error(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await client(gw, t.key).chat.completions.create(
            model="echo-nousage", messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.status_code == 403
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "not_entitled"


async def test_unknown_model_is_a_404_model_not_found(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["echo"])
    with pytest.raises(openai.NotFoundError) as missing:
        await client(gw, t.key).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    body = missing.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_found"


async def test_model_without_an_approved_catalog_version_is_refused(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["unapproved", "uncatalogued"])
    for model in ("unapproved", "uncatalogued"):
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client(gw, t.key).chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}]
            )
        body = refused.value.body
        assert isinstance(body, dict) and body["code"] == "not_approved"


async def test_client_credentials_never_reach_the_upstream_and_routes_rename_models(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, upstream: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["public-name"])
    answer = await client(gw, t.key).chat.completions.create(
        model="public-name", messages=[{"role": "user", "content": "renamed"}]
    )
    assert answer.model == "echo-internal"
    seen = [
        r
        for r in await upstream_json(upstream, "/_log")
        if r["body"].get("model") == "echo-internal"
    ]
    headers = seen[-1]["headers"]
    assert headers["authorization"] == "Bearer upstream-secret"
    assert t.key not in str(headers)
