"""The OpenAI-compatible data plane: ``/v1/models``, chat and text completions, embeddings.

Per request: one credential check against the replica, one role/scope decision, two set lookups
(entitlement, approved version), one JSON parse of the body (and one re-serialisation when the
body must change), then the pooled upstream call. Errors are OpenAI error objects.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from starlette.types import Receive, Scope, Send

from gateway.authn import AuthFailure, project_of
from gateway.calls import Call, Kind, until_disconnect
from gateway.egress import MODEL
from gateway.http import (
    CLOSE,
    BodyError,
    BodyTooLarge,
    ClientGone,
    openai_error,
    read_body,
    send_json,
    upstream_header_list,
)
from gateway.journal import PROGRESS_SECONDS
from gateway.quota import client_headers
from gateway.routes import ModelRoute
from gateway.sse import StreamRelay
from gateway.tokens import (
    ESTIMATE,
    ModelTokenizer,
    TokenCounter,
    UsageLimits,
    completion_text,
    estimate_chars,
    estimate_prompt,
    reported_usage,
)
from gateway.upstream import (
    UpstreamConnectError,
    UpstreamDenied,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
)
from libs.common.auth import Principal, decide
from libs.common.events.catalog import VersionState
from libs.common.events.inference import CredentialError, open_credential
from libs.common.observability import GEN_AI_OPERATIONS
from libs.common.outbox import current_traceparent

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("steward.gateway.inference")

ENDPOINTS: dict[str, Kind] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
}
SSE = b"text/event-stream"


class Refusal(Exception):
    """A request the gateway answers itself, as an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = openai_error(message, type_, code=code, param=param)
        self.type_ = code or type_
        self.headers = headers or []


_AUTH_TYPES = {401: "authentication_error", 403: "permission_error", 503: "service_unavailable"}


def _from_auth(failure: AuthFailure) -> Refusal:
    type_ = _AUTH_TYPES.get(failure.status, "invalid_request_error")
    return Refusal(failure.status, failure.message, type_, code=failure.code)


class InferenceProxy:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.created = int(time.time())

    async def __call__(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        extra = [(b"x-request-id", rid)]
        try:
            await self._handle(scope, receive, send, extra)
        except Refusal as refusal:
            await send_json(send, refusal.status, refusal.body, extra + refusal.headers)

    async def _authorise(self, scope: Scope) -> tuple[Principal, str]:
        try:
            principal = await self.gw.authn.principal(scope)
            project = project_of(principal, scope)
        except AuthFailure as failure:
            raise _from_auth(failure) from None
        return principal, project

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, extra: list[tuple[bytes, bytes]]
    ) -> None:
        path: str = scope["path"]
        kind = ENDPOINTS.get(path)
        if kind is None:
            if path == "/v1/models" or path.startswith("/v1/models/"):
                await self._models(scope, send, extra)
                return
            raise Refusal(404, f"Unknown request URL: {path}", "invalid_request_error")
        if scope["method"] != "POST":
            raise Refusal(405, f"{path} accepts POST only", "invalid_request_error")
        principal, project = await self._authorise(scope)
        decision = decide(principal, "inference.invoke", project)
        if not decision.allowed:
            raise Refusal(403, decision.reason, "permission_error", code="forbidden")
        try:
            body = await read_body(
                scope,
                receive,
                self.gw.settings.gateway_max_request_bytes,
                self.gw.settings.gateway_body_timeout_seconds,
            )
        except BodyTooLarge as exc:
            raise Refusal(
                413, str(exc), "invalid_request_error", code="request_too_large", headers=CLOSE
            ) from exc
        except BodyError as exc:
            raise Refusal(
                exc.status, str(exc), "invalid_request_error", code="timeout", headers=CLOSE
            ) from exc
        except ClientGone:
            return
        request = _parse(body)
        model = request.get("model")
        if not isinstance(model, str) or not model:
            raise Refusal(400, "'model' is required", "invalid_request_error", param="model")
        route, version = self._route(project, model)
        call = Call(
            project=project,
            credential_id=principal.credential_id,
            subject=principal.subject,
            model=model,
            endpoint=route.name,
            kind=kind,
            asset=route.asset_name,
            asset_version=version.version,
            started=time.perf_counter(),
            gateway_id=self.gw.quota.gateway_id,
        )
        counter = await self.gw.tokenizers.counter(version.tokenizer)
        span = trace.get_current_span() if self.gw.tracer is not None else None
        try:
            await self._call(scope, receive, send, extra, request, body, route, call, counter)
        except Refusal as refusal:
            call.fail(refusal.status, refusal.type_)
            raise
        finally:
            call.observe()
            if span is None:
                self.gw.usage.record(call.to_event())
            else:
                _annotate(span, call)
                self.gw.usage.record(call.to_event(), traceparent=current_traceparent())

    async def _models(self, scope: Scope, send: Send, extra: list[tuple[bytes, bytes]]) -> None:
        """Exactly the models this caller may call: entitled, approved, and routed."""
        if scope["method"] != "GET":
            raise Refusal(405, "/v1/models accepts GET only", "invalid_request_error")
        principal, project = await self._authorise(scope)
        visible: dict[str, dict[str, Any]] = {}
        if decide(principal, "inference.invoke", project).allowed:
            for name, route in self.gw.routes.models.items():
                if (
                    route.visible_to(project)
                    and self.gw.auth.entitled(project, "model", route.asset_name)
                    and self.gw.catalog.approved("model", route.asset_name, route.version)
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
            raise Refusal(
                404, "The model does not exist", "invalid_request_error", code="model_not_found"
            )
        await send_json(send, 200, card, extra)

    def _route(self, project: str, model: str) -> tuple[ModelRoute, VersionState]:
        """The route serving ``model`` for ``project``, and the approved catalog version it
        serves (the route's pinned one, else the newest approved)."""
        route = self.gw.routes.models.get(model)
        if route is None or not route.visible_to(project):
            raise Refusal(
                404,
                f"The model '{model}' does not exist",
                "invalid_request_error",
                code="model_not_found",
                param="model",
            )
        if not self.gw.auth.entitled(project, "model", route.asset_name):
            raise Refusal(
                403,
                f"project '{project}' is not entitled to the model '{model}'",
                "permission_error",
                code="not_entitled",
            )
        if not self.gw.catalog.loaded:
            raise Refusal(503, "the catalog replica is not loaded yet", "service_unavailable")
        version = self.gw.catalog.approved("model", route.asset_name, route.version)
        if version is None:
            raise Refusal(
                403,
                f"the model '{model}' has no approved catalog version",
                "permission_error",
                code="not_approved",
            )
        return route, version

    async def _call(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        extra: list[tuple[bytes, bytes]],
        request: dict[str, Any],
        body: bytes,
        route: ModelRoute,
        call: Call,
        counter: TokenCounter,
    ) -> None:
        cap = route.max_tokens or self.gw.settings.gateway_max_tokens
        for param in ("max_tokens", "max_completion_tokens"):
            value = request.get(param)
            if value is not None and (not isinstance(value, int) or value > cap):
                raise Refusal(
                    400,
                    f"'{param}' must be an integer of at most {cap}",
                    "invalid_request_error",
                    param=param,
                )
        prompt_estimate = estimate_prompt(request)
        max_out = request.get("max_tokens") or request.get("max_completion_tokens") or 0
        reservation = self.gw.quota.reserve(
            project=call.project,
            credential_id=call.credential_id,
            model=call.model,
            input_tokens=prompt_estimate,
            output_tokens=int(max_out),
        )
        if not reservation.allowed:
            raise Refusal(
                429,
                reservation.reason or "token quota exceeded",
                "insufficient_quota",
                code="quota_exceeded",
                headers=client_headers(reservation),
            )
        extra.extend(client_headers(reservation))
        modified = False
        strip_usage = False
        call.stream = call.kind != "embedding" and request.get("stream") is True
        if call.stream:
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
        headers = upstream_header_list(scope, [(b"x-request-id", extra[0][1])])
        if route.api_key is not None:
            secret = route.api_key.get_secret_value()
            headers.append((b"authorization", b"Bearer " + secret.encode()))
        elif route.sealed_api_key is not None:
            try:
                secret = open_credential(
                    self.gw.settings.upstream_credential_fernet_key, route.sealed_api_key
                )
            except CredentialError:
                log.error("cannot open the upstream credential", extra={"route": route.name})
                raise Refusal(
                    502, "the model's upstream credential is unusable", "upstream_error"
                ) from None
            headers.append((b"authorization", b"Bearer " + secret.encode()))
        url = route.upstream + scope["path"][3:]
        state = _Progress(
            request, prompt_estimate, UsageLimits.of(request, len(body), cap), counter
        )
        journal = self.gw.usage.journal
        if journal is not None:
            journal.begin(call.interrupted(prompt_estimate))
        work = self._exchange(
            send,
            extra,
            url,
            headers,
            content,
            route.timeout_seconds,
            call,
            request,
            strip_usage,
            state,
            route.guarded,
        )
        try:
            if await until_disconnect(work, receive):
                _after_disconnect(call, state)
        except UpstreamTimeout as exc:
            call.fail(504, "timeout")
            if not isinstance(exc, UpstreamConnectError):
                _settle_cut_stream(call, state)
            if not state.started:
                raise Refusal(504, "the model did not answer in time", "timeout") from None
            await _end_stream_with_error(send, "the model stopped answering", "timeout")
            return
        except UpstreamDenied as exc:
            call.fail(502, "upstream_denied")
            log.warning("upstream address refused", extra={"route": route.name, "error": str(exc)})
            raise Refusal(
                502, "the model's upstream address is not allowed", "upstream_error"
            ) from None
        except UpstreamError as exc:
            call.fail(502, "upstream_unavailable")
            if not isinstance(exc, UpstreamConnectError):
                _settle_cut_stream(call, state)
            log.warning("upstream unreachable", extra={"route": route.name, "error": str(exc)})
            if not state.started:
                raise Refusal(502, "the model is unreachable", "upstream_error") from None
            await _end_stream_with_error(send, "the model connection broke", "upstream_error")
            return
        finally:
            # After the call's tokens are known, however it ended.
            self.gw.quota.settle(
                reservation, input_tokens=call.prompt_tokens, output_tokens=call.completion_tokens
            )

    async def _exchange(
        self,
        send: Send,
        extra: list[tuple[bytes, bytes]],
        url: str,
        headers: list[tuple[bytes, bytes]],
        content: bytes,
        read_timeout: float | None,
        call: Call,
        request: dict[str, Any],
        strip_usage: bool,
        state: _Progress,
        guarded: bool,
    ) -> None:
        call.sent_upstream = time.perf_counter()
        response = await self.gw.upstream.request(
            "POST", url, headers, content, read_timeout=read_timeout, guarded=guarded
        )
        try:
            call.http_status = response.status
            if not MODEL.relayed(response.status):
                await self._replace(send, response, extra, url, call, request, state)
                return
            out = MODEL.headers(response.headers) + extra
            content_type = response.header(b"content-type") or b""
            if call.stream and response.status == 200 and content_type.startswith(SSE):
                await self._relay_stream(send, response, out, call, request, strip_usage, state)
            else:
                payload = await response.read()
                state.started = True
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status,
                        "headers": [*out, (b"content-length", str(len(payload)).encode())],
                    }
                )
                await send({"type": "http.response.body", "body": payload})
                state.complete = True
                _account(call, response.status, payload, request, state)
        finally:
            response.close()

    async def _replace(
        self,
        send: Send,
        response: UpstreamResponse,
        extra: list[tuple[bytes, bytes]],
        url: str,
        call: Call,
        request: dict[str, Any],
        state: _Progress,
    ) -> None:
        """A non-2xx answer: the client gets what gateway/egress.py keeps of it."""
        redirect = response.status < 400
        raw = b"" if redirect else await response.read()
        status, body = MODEL.replaced(response.status, raw, url)
        if redirect:
            call.fail(status, "upstream_redirect")
        else:
            _account(call, response.status, raw, request, state)
        state.started = True
        headers = MODEL.error_headers(response.headers, body) + extra
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        state.complete = True

    async def _relay_stream(
        self,
        send: Send,
        response: UpstreamResponse,
        headers: list[tuple[bytes, bytes]],
        call: Call,
        request: dict[str, Any],
        strip_usage: bool,
        state: _Progress,
    ) -> None:
        relay = StreamRelay(
            strip_usage=strip_usage, keep_text=isinstance(state.counter, ModelTokenizer)
        )
        state.relay = relay
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        state.started = True
        journal = self.gw.usage.journal
        checkpoint = time.perf_counter() + PROGRESS_SECONDS
        async for chunk in response.iter_body():
            out = relay.feed(chunk)
            if call.first_token is None and relay.first_content:
                call.first_token = time.perf_counter()
            if journal is not None and time.perf_counter() >= checkpoint:
                # What it streamed so far, should the gateway stop before the call ends.
                journal.progress(call.event_id, estimate_chars(relay.chars))
                checkpoint = time.perf_counter() + PROGRESS_SECONDS
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
                state.answered = relay.done
        tail = relay.flush()
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        state.complete = True
        _settle_stream_usage(call, state)
        if relay.upstream_error is not None:
            call.status = "error"
            call.error_type = str(relay.upstream_error.get("type") or "upstream_error")
        elif not relay.done:
            call.status = "error"
            call.error_type = "upstream_incomplete"


def _annotate(span: trace.Span, call: Call) -> None:
    """What the gateway learnt about the call, on its request's span."""
    if span.is_recording():
        span.set_attributes(
            {
                "steward.project": call.project,
                "steward.endpoint": call.endpoint,
                "gen_ai.operation.name": GEN_AI_OPERATIONS[call.kind],
                "gen_ai.request.model": call.model,
                "gen_ai.usage.input_tokens": call.prompt_tokens,
                "gen_ai.usage.output_tokens": call.completion_tokens,
                "steward.call.status": call.status,
            }
        )


class _Progress:
    """How far a response got: headers sent (no more error status possible), ``[DONE]`` sent
    (the client has the whole answer), all sent."""

    __slots__ = (
        "_counted",
        "answered",
        "complete",
        "counter",
        "estimate",
        "limits",
        "relay",
        "request",
        "started",
    )

    def __init__(
        self, request: dict[str, Any], estimate: int, limits: UsageLimits, counter: TokenCounter
    ) -> None:
        self.request = request
        self.estimate = estimate  # the prompt estimate the quota reserved
        self.limits = limits
        self.counter = counter
        self._counted: int | None = None
        self.started = False
        self.answered = False
        self.complete = False
        self.relay: StreamRelay | None = None

    def prompt(self) -> int:
        """The prompt's tokens by the model's counter (once; the estimate is already known)."""
        if self.counter is ESTIMATE:
            return self.estimate
        if self._counted is None:
            self._counted = self.counter.prompt(self.request)
        return self._counted


def _parse(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body)
    except RecursionError:
        raise Refusal(400, "the body is nested too deeply", "invalid_request_error") from None
    except ValueError:
        raise Refusal(400, "the body is not valid JSON", "invalid_request_error") from None
    if not isinstance(request, dict):
        raise Refusal(400, "the body must be a JSON object", "invalid_request_error")
    return request


def _account(
    call: Call, status: int, payload: bytes, request: dict[str, Any], state: _Progress
) -> None:
    """Tokens of a non-streamed answer: the upstream's usage if believable, else our count."""
    if status >= 400:
        call.status = "error"
        call.error_type = f"upstream_{status}"
        try:
            error = json.loads(payload).get("error")
            if isinstance(error, dict) and isinstance(error.get("type"), str):
                call.error_type = error["type"]
        except (ValueError, AttributeError, RecursionError):
            pass
        return
    try:
        response = json.loads(payload)
    except (ValueError, RecursionError):
        response = None
    usage = response.get("usage") if isinstance(response, dict) else None
    reported = reported_usage(usage, state.limits)
    if isinstance(reported, tuple):
        call.prompt_tokens, call.completion_tokens = reported
        return
    counter = state.counter
    call.usage_source = "corrected" if reported == "implausible" else counter.source
    call.prompt_tokens = state.prompt()
    if isinstance(response, dict) and call.kind != "embedding":
        call.completion_tokens = counter.text(completion_text(response))


def _after_disconnect(call: Call, state: _Progress) -> None:
    """The client left. After ``[DONE]`` it had the whole answer (it hung up before the
    upstream's last bytes): the call is complete, with the usage it carried. Before, the call
    was cancelled and its tokens are estimated from what was relayed."""
    if state.complete:
        return
    if state.answered:
        assert state.relay is not None
        state.complete = True
        _settle_stream_usage(call, state)
        return
    call.status = "cancelled"
    call.error_type = "client_disconnected"
    call.http_status = call.http_status or 499
    _settle_cut_stream(call, state)


def _settle_stream_usage(call: Call, state: _Progress) -> None:
    relay = state.relay
    assert relay is not None
    reported = reported_usage(relay.usage, state.limits)
    if isinstance(reported, tuple) and relay.done:
        call.prompt_tokens, call.completion_tokens = reported
        call.usage_source = "upstream"
        return
    call.usage_source = "corrected" if reported == "implausible" else state.counter.source
    call.prompt_tokens = reported[0] if isinstance(reported, tuple) else state.prompt()
    call.completion_tokens = state.counter.streamed(relay)


def _settle_cut_stream(call: Call, state: _Progress) -> None:
    """A stream that did not finish: count what was relayed (the upstream's usage, if any came,
    does not cover what the client never got)."""
    if state.relay is not None and not state.complete:
        _settle_stream_usage(call, state)
        if call.usage_source == "upstream":
            call.usage_source = state.counter.source
    elif state.relay is None:
        call.prompt_tokens = state.prompt()
        call.usage_source = state.counter.source


async def _end_stream_with_error(send: Send, message: str, type_: str) -> None:
    """Mid-stream failures reach OpenAI clients as an ``error`` event (the SDKs raise on it)."""
    event = b"data: " + json.dumps(openai_error(message, type_)).encode() + b"\n\n"
    try:
        await send({"type": "http.response.body", "body": event, "more_body": False})
    except Exception as exc:  # the client may be gone too; nothing left to tell it
        log.debug("could not end the stream", extra={"error": str(exc)})
