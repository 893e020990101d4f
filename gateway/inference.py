"""The OpenAI-compatible data plane: ``/v1/models``, chat and text completions, embeddings.

Per request: admission (gateway/admission.py: the credential, role and scope, the project's
entitlement, an approved catalog version), one JSON parse of the body (and one re-serialisation
when it must change), the upstream request built (its credential unsealed) before any quota is
held, then the exchange (gateway/exchange.py): reserve, send, relay, and one finaliser that
settles the quota and records the usage. Errors are OpenAI error objects.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.types import Receive, Scope, Send

from gateway.admission import Admission, Refusal
from gateway.balance import Balancer
from gateway.calls import Call, Kind, until_disconnect
from gateway.egress import MODEL
from gateway.exchange import Exchange
from gateway.http import (
    CLOSE,
    BodyError,
    BodyTooLarge,
    ClientGone,
    Headers,
    body_limits,
    openai_error,
    read_body,
    send_json,
    upstream_header_list,
)
from gateway.journal import PROGRESS_SECONDS
from gateway.quota import client_headers
from gateway.routes import ModelRoute, RouteTable
from gateway.upstream import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)
from gateway.usage import UsageRecorder
from gateway.vocab import Tokenizers
from libs.common.auth import decide
from libs.common.events.inference import CredentialError, open_credential
from libs.common.settings import Settings

log = logging.getLogger("steward.gateway.inference")

ENDPOINTS: dict[str, Kind] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
}
SSE = b"text/event-stream"
# Upstream answers that send a call to the project's fallback, if it has one.
BUSY = frozenset({429, 503})
# What the client is told when neither the model nor a fallback could take the call.
_UNSERVED = {
    "busy": (503, "the model is busy and no fallback could take the call", "upstream_busy"),
    "unavailable": (
        502,
        "no replica of the model and no fallback could take the call",
        "upstream_unavailable",
    ),
}
# What the client is told when the upstream fails: before the answer began, and after.
_FAILED = {
    "timeout": "the model did not answer in time",
    "upstream_denied": "the model's upstream address is not allowed",
    "upstream_unavailable": "the model is unreachable",
}


class InferenceProxy:
    def __init__(
        self,
        *,
        admission: Admission,
        routes: RouteTable,
        upstream: UpstreamPool,
        usage: UsageRecorder,
        tokenizers: Tokenizers,
        settings: Settings,
        traced: bool,
    ) -> None:
        self.admission = admission
        self.routes = routes
        self.upstream = upstream
        self.usage = usage
        self.tokenizers = tokenizers
        self.settings = settings
        self.body = body_limits(settings)
        self.traced = traced
        self.created = int(time.time())
        # Spreads a route's calls over its replicas (gateway/balance.py).
        self.balancer = Balancer()

    async def __call__(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        extra = [(b"x-request-id", rid)]
        try:
            await self._handle(scope, receive, send, extra)
        except Refusal as refusal:
            await send_json(send, refusal.status, refusal.openai(), extra + refusal.headers)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, extra: Headers) -> None:
        path: str = scope["path"]
        kind = ENDPOINTS.get(path)
        if kind is None:
            if path == "/v1/models" or path.startswith("/v1/models/"):
                await self._models(scope, send, extra)
                return
            raise Refusal(404, f"Unknown request URL: {path}")
        if scope["method"] != "POST":
            raise Refusal(405, f"{path} accepts POST only")
        who = await self.admission.caller(scope, "inference.invoke")
        body = await self._body(scope, receive)
        if body is None:
            return
        request = _parse(body)
        model = request.get("model")
        if not isinstance(model, str) or not model:
            raise Refusal(400, "'model' is required", param="model")
        route, fell_from = self._route(who.project, model)
        if fell_from is not None:  # the request goes to the fallback, under its own name
            request["model"] = model = route.name
            body = json.dumps(request, separators=(",", ":")).encode()
        version = self.admission.version(
            who.project, "model", route.asset_name, route.version, f"the model '{model}'"
        )
        call = Call(
            project=who.project,
            credential_id=who.principal.credential_id,
            subject=who.principal.subject,
            model=model,
            fallback_from=fell_from,
            endpoint=route.name,
            kind=kind,
            asset=route.asset_name,
            asset_version=version.version,
            started=time.perf_counter(),
            gateway_id=self.admission.quota.gateway_id,
            request_id=extra[0][1].decode(),
        )
        exchange = Exchange(
            call,
            request,
            body_bytes=len(body),
            cap=route.max_tokens or self.settings.gateway_max_tokens,
            counter=await self.tokenizers.counter(version.tokenizer),
            admission=self.admission,
            usage=self.usage,
            traced=self.traced,
        )
        with exchange:
            await self._call(scope, receive, send, extra, exchange, route, body)

    async def _body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The request body (None: the client left while sending it)."""
        try:
            return await read_body(scope, receive, self.body)
        except BodyTooLarge as exc:
            raise Refusal(413, str(exc), "request_too_large", headers=CLOSE) from exc
        except BodyError as exc:
            raise Refusal(exc.status, str(exc), "timeout", headers=CLOSE) from exc
        except ClientGone:
            return None

    async def _models(self, scope: Scope, send: Send, extra: Headers) -> None:
        """Exactly the models this caller may call: entitled, approved, and routed."""
        if scope["method"] != "GET":
            raise Refusal(405, "/v1/models accepts GET only")
        who = await self.admission.identify(scope)
        visible: dict[str, dict[str, Any]] = {}
        allowed = decide(who.principal, "inference.invoke", who.project).allowed
        for name, route in self.routes.models.items() if allowed else ():
            if route.visible_to(who.project) and self.admission.offered(
                who.project, "model", route.asset_name, route.version
            ):
                visible[name] = {
                    "id": name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "steward",
                }
        path: str = scope["path"]
        if path == "/v1/models":
            await send_json(send, 200, {"object": "list", "data": list(visible.values())}, extra)
            return
        card = visible.get(path.removeprefix("/v1/models/"))
        if card is None:
            raise Refusal(404, "The model does not exist", "model_not_found")
        await send_json(send, 200, card, extra)

    def _route(self, project: str, model: str) -> tuple[ModelRoute, str | None]:
        """The route for ``model``, and the model asked for when a fallback takes the call
        (None: the model's own route)."""
        route = self.routes.models.get(model)
        if route is not None and route.visible_to(project):
            return route, None
        starting = self.routes.starting(model, project)
        if starting is None:
            raise Refusal(
                404, f"The model '{model}' does not exist", "model_not_found", param="model"
            )
        # Being provisioned (first, or again after its inference leader was lost): no replica
        # yet, so the project's fallback chain may take the call, as when none is healthy; the
        # project must still be entitled to the model it asked for.
        self.admission.version(
            project, "model", starting.asset, starting.version, f"the model '{model}'"
        )
        for name in self.admission.auth.fallbacks(project, starting.asset):
            if self._usable(project, name):
                log.warning("falling back", extra={"from": model, "to": name, "why": "starting"})
                return self.routes.models[name], model
        # Retryable (clients and SDKs retry a 503 by themselves).
        raise Refusal(
            503,
            f"The model '{model}' is starting; retry shortly",
            "model_not_ready",
            headers=[(b"retry-after", b"5")],
        )

    async def _call(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        extra: Headers,
        exchange: Exchange,
        route: ModelRoute,
        body: bytes,
    ) -> None:
        request, call = exchange.request, exchange.call
        cap = route.max_tokens or self.settings.gateway_max_tokens
        for param in ("max_tokens", "max_completion_tokens"):
            value = request.get(param)
            if value is not None and (not isinstance(value, int) or value > cap):
                raise Refusal(400, f"'{param}' must be an integer of at most {cap}", param=param)
        call.stream = call.kind != "embedding" and request.get("stream") is True
        content, strip_usage = self._content(request, body, route, call.stream)
        # Everything that can refuse the call comes before its quota hold.
        headers = self._headers(scope, extra, route)
        max_out = request.get("max_tokens") or request.get("max_completion_tokens") or 0
        extra.extend(client_headers(exchange.reserve(int(max_out))))
        exchange.begin(self.usage.journal)
        # The fallbacks that may serve this project now (checked again when one is used).
        chain = [
            name
            for name in self.admission.auth.fallbacks(call.project, route.asset_name)
            if self._usable(call.project, name)
        ]
        while True:
            fell = await self._serve(
                scope,
                receive,
                send,
                extra,
                exchange,
                route,
                headers,
                content,
                strip_usage,
                may_fall_back=bool(chain),
            )
            if fell is None:
                return
            found = self._fallback(scope, extra, exchange, chain, fell)
            if found is None:  # none of the chain could take it after all
                raise Refusal(*_UNSERVED.get(fell, _UNSERVED["unavailable"]))
            route, headers, content = found

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        extra: Headers,
        exchange: Exchange,
        route: ModelRoute,
        headers: Headers,
        content: bytes,
        strip_usage: bool,
        *,
        may_fall_back: bool,
    ) -> str | None:
        """Send the call to the route's replicas (gateway/balance.py) until one answers. Returns
        why it could not be served, when a fallback may take it (nothing reached the client):
        no replica took it, or the upstream answered 429/503; else None."""
        call = exchange.call
        path = scope["path"][3:]
        tried: list[str] = []
        while (base := self.balancer.pick(route.targets, tried)) is not None:
            tried.append(base)
            work = self._exchange(
                send,
                extra,
                base + path,
                headers,
                content,
                route,
                exchange,
                strip_usage,
                busy_is_final=not may_fall_back,
            )
            failure: UpstreamError | _Busy | None = None
            self.balancer.begin(base)
            try:
                if await until_disconnect(work, receive):
                    exchange.client_left()
            except (UpstreamError, _Busy) as exc:
                failure = exc
            finally:
                refused = isinstance(failure, UpstreamConnectError)
                self.balancer.end(base, connect_failed=refused, status=call.http_status)
            if failure is None:
                return None
            if isinstance(failure, _Busy):
                return "busy"
            if (
                not exchange.started
                and not isinstance(failure, UpstreamTimeout)
                and len(tried) < len(route.targets)
            ):
                # The replica refused or dropped the call and the client has nothing yet:
                # another replica answers it (a slow one is not retried: that would double
                # the wait).
                log.warning(
                    "replica failed the call; trying another",
                    extra={"route": route.name, "kind": failure.kind},
                )
                continue
            if may_fall_back and not exchange.started and not isinstance(failure, UpstreamTimeout):
                return "unavailable"
            await self._failed(send, route, exchange, failure)
            return None
        return None

    def _usable(self, project: str, name: str) -> bool:
        """A model the project may fall back to: routed for it, entitled, approved."""
        route = self.routes.models.get(name)
        return (
            route is not None
            and route.visible_to(project)
            and self.admission.offered(project, "model", route.asset_name, route.version)
        )

    def _fallback(
        self,
        scope: Scope,
        extra: Headers,
        exchange: Exchange,
        chain: list[str],
        why: str,
    ) -> tuple[ModelRoute, Headers, bytes] | None:
        """The next model of the project's chain that may serve now: routed for the project,
        entitled, with an approved version, its credential usable. The call is then that
        model's (its usage event names it, and the model asked for in ``fallback_from``)."""
        call = exchange.call
        while chain:
            name = chain.pop(0)
            route = self.routes.models.get(name)
            if route is None or not route.visible_to(call.project):
                log.info("fallback skipped: not routed", extra={"model": name})
                continue
            try:
                version = self.admission.version(
                    call.project, "model", route.asset_name, route.version, f"the model '{name}'"
                )
                headers = self._headers(scope, extra, route)
            except Refusal as refusal:
                log.info("fallback skipped", extra={"model": name, "reason": refusal.reason})
                continue
            # The request as first sent (usage asked for on a stream), for this model.
            exchange.request["model"] = route.upstream_model or name
            content = json.dumps(exchange.request, separators=(",", ":")).encode()
            log.warning("falling back", extra={"from": call.model, "to": name, "why": why})
            call.fallback_from = call.fallback_from or call.model
            call.model, call.endpoint = name, route.name
            call.asset, call.asset_version = route.asset_name, version.version
            call.http_status = 0
            return route, headers, content
        return None

    async def _failed(
        self, send: Send, route: ModelRoute, exchange: Exchange, exc: UpstreamError
    ) -> None:
        """The upstream failed: an error before the answer began, else the stream's end."""
        status = 504 if isinstance(exc, UpstreamTimeout) else 502
        exchange.call.fail(status, exc.kind)
        if not isinstance(exc, UpstreamConnectError):
            exchange.cut()
        log.warning(
            "upstream failed", extra={"route": route.name, "kind": exc.kind, "error": str(exc)}
        )
        if not exchange.started:
            raise Refusal(
                status, _FAILED.get(exc.kind, _FAILED["upstream_unavailable"]), exc.kind
            ) from None
        if status == 504:
            await _end_stream_with_error(send, "the model stopped answering", "timeout")
        else:
            await _end_stream_with_error(send, "the model connection broke", "upstream_error")

    def _content(
        self, request: dict[str, Any], body: bytes, route: ModelRoute, stream: bool
    ) -> tuple[bytes, bool]:
        """The body to send upstream (the client's own bytes unless it must change), and
        whether the usage chunk asked for on the client's behalf is to be dropped."""
        modified = strip_usage = False
        if stream:
            options = request.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                request["stream_options"] = {
                    **(options if isinstance(options, dict) else {}),
                    "include_usage": True,
                }
                strip_usage = modified = True
        if route.upstream_model:
            request["model"] = route.upstream_model
            modified = True
        content = json.dumps(request, separators=(",", ":")).encode() if modified else body
        return content, strip_usage

    def _headers(self, scope: Scope, extra: Headers, route: ModelRoute) -> Headers:
        """The upstream's headers, with the route's credential (never the client's)."""
        headers = upstream_header_list(scope, [(b"x-request-id", extra[0][1])])
        if route.api_key is not None:
            secret = route.api_key.get_secret_value()
            headers.append((b"authorization", b"Bearer " + secret.encode()))
        elif route.sealed_api_key is not None:
            try:
                secret = open_credential(
                    self.settings.upstream_credential_fernet_key, route.sealed_api_key
                )
            except CredentialError:
                log.error("cannot open the upstream credential", extra={"route": route.name})
                raise Refusal(
                    502, "the model's upstream credential is unusable", "upstream_credential"
                ) from None
            headers.append((b"authorization", b"Bearer " + secret.encode()))
        return headers

    async def _exchange(
        self,
        send: Send,
        extra: Headers,
        url: str,
        headers: Headers,
        content: bytes,
        route: ModelRoute,
        exchange: Exchange,
        strip_usage: bool,
        *,
        busy_is_final: bool = True,
    ) -> None:
        call = exchange.call
        call.sent_upstream = time.perf_counter()
        response = await self.upstream.request(
            "POST",
            url,
            headers,
            content,
            read_timeout=route.timeout_seconds,
            guarded=route.guarded,
        )
        try:
            call.http_status = response.status
            if not busy_is_final and response.status in BUSY:
                raise _Busy(response.status)  # a fallback may take it; the client saw nothing
            if not MODEL.relayed(response.status):
                await self._replace(send, response, extra, url, exchange)
                return
            out = MODEL.headers(response.headers) + extra
            content_type = response.header(b"content-type") or b""
            if call.stream and response.status == 200 and content_type.startswith(SSE):
                await self._relay_stream(send, response, out, exchange, strip_usage)
            else:
                payload = await response.read()
                exchange.started = True
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status,
                        "headers": [*out, (b"content-length", str(len(payload)).encode())],
                    }
                )
                await send({"type": "http.response.body", "body": payload})
                exchange.complete = True
                exchange.account(response.status, payload)
        finally:
            response.close()

    async def _replace(
        self,
        send: Send,
        response: UpstreamResponse,
        extra: Headers,
        url: str,
        exchange: Exchange,
    ) -> None:
        """A non-2xx answer: the client gets what gateway/egress.py keeps of it."""
        redirect = response.status < 400
        raw = b"" if redirect else await response.read()
        status, body = MODEL.replaced(response.status, raw, url)
        if redirect:
            exchange.call.fail(status, "upstream_redirect")
        else:
            exchange.account(response.status, raw)
        exchange.started = True
        headers = MODEL.error_headers(response.headers, body) + extra
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        exchange.complete = True

    async def _relay_stream(
        self,
        send: Send,
        response: UpstreamResponse,
        headers: Headers,
        exchange: Exchange,
        strip_usage: bool,
    ) -> None:
        call = exchange.call
        relay = exchange.stream_relay(strip_usage=strip_usage)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        exchange.started = True
        journal = self.usage.journal
        checkpoint = time.perf_counter() + PROGRESS_SECONDS
        async for chunk in response.iter_body():
            out = relay.feed(chunk)
            if call.first_token is None and relay.first_content:
                call.first_token = time.perf_counter()
            if journal is not None and time.perf_counter() >= checkpoint:
                # What it streamed so far, should the gateway stop before the call ends.
                journal.progress(call.event_id, exchange.streamed_estimate())
                checkpoint = time.perf_counter() + PROGRESS_SECONDS
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
                exchange.answered = relay.done
        tail = relay.flush()
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        exchange.stream_ended()


class _Busy(Exception):
    """The upstream answered 429/503 and a fallback may take the call instead."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _parse(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body)
    except RecursionError:
        raise Refusal(400, "the body is nested too deeply") from None
    except ValueError:
        raise Refusal(400, "the body is not valid JSON") from None
    if not isinstance(request, dict):
        raise Refusal(400, "the body must be a JSON object")
    return request


async def _end_stream_with_error(send: Send, message: str, type_: str) -> None:
    """Mid-stream failures reach OpenAI clients as an ``error`` event (the SDKs raise on it)."""
    event = b"data: " + json.dumps(openai_error(message, type_)).encode() + b"\n\n"
    try:
        await send({"type": "http.response.body", "body": event, "more_body": False})
    except Exception as exc:  # the client may be gone too; nothing left to tell it
        log.debug("could not end the stream", extra={"error": str(exc)})
