"""Trace context in the gateway: what its spans are made with, and how the context travels on.

The gateway opens a SERVER span per proxied request (``gateway/app.py``), a CLIENT span per model
upstream call (``gateway/upstream.py``), and hands the context to every service and upstream it
calls, and to the usage event of the call. All of it only when a real tracer provider was set
before the gateway started (``configure_tracing``): otherwise ``configured_tracer`` is None and
the request path does no tracing work at all — not even the no-op API's, which costs several
microseconds a request. The client's own ``traceparent`` then passes through to the upstream
unchanged with its other headers, which is what the no-op API would have sent too.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping, Sequence

import httpx
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter

from gateway.http import Headers

# https://opentelemetry.io/docs/specs/semconv/http/http-spans/: other methods are "_OTHER".
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


def configured_tracer() -> trace.Tracer | None:
    """The gateway's tracer if a tracer provider is installed, else None (tracing off).

    Asked once, at start: the API's proxy provider would tell the same thing on every request,
    but asking costs more than a microsecond (it reads the environment).
    """
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return provider.get_tracer("steward.gateway")


class _AsgiHeaders(Getter[Sequence[tuple[bytes, bytes]]]):
    """Reads propagation fields straight from an ASGI header list (lower-case byte names)."""

    def get(self, carrier: Sequence[tuple[bytes, bytes]], key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        found = [value.decode("latin-1") for header, value in carrier if header == name]
        if len(found) > 1 and name == b"baggage":
            return [",".join(found)]  # the baggage propagator reads only the first value
        return found or None

    def keys(self, carrier: Sequence[tuple[bytes, bytes]]) -> list[str]:
        return [header.decode("latin-1") for header, _ in carrier]


ASGI_HEADERS = _AsgiHeaders()


def extract(headers: Sequence[tuple[bytes, bytes]]) -> Context:
    """The caller's context (``traceparent``, ``tracestate``, ``baggage``) from ASGI headers."""
    return propagate.extract(headers, getter=ASGI_HEADERS)


def _fields(context: Context | None) -> tuple[set[str], dict[str, str]]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return propagate.get_global_textmap().fields | set(carrier), carrier


def with_context(headers: Iterable[tuple[bytes, bytes]], context: Context | None = None) -> Headers:
    """``headers`` carrying ``context`` (default: the current one) instead of the client's own.

    The client's propagation headers are dropped first: they were extracted into the context
    already, and two ``traceparent`` headers would leave the upstream to pick one.
    """
    fields, carrier = _fields(context)
    names = {field.lower().encode("latin-1") for field in fields}
    out = [(name, value) for name, value in headers if name not in names]
    out.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items())
    return out


def inject_into(headers: MutableMapping[str, str]) -> None:
    """Replace the client's propagation headers in a (lower-case) header dict with the current
    context's."""
    fields, carrier = _fields(None)
    for field in fields:
        headers.pop(field, None)
    headers.update(carrier)


async def inject_httpx(request: httpx.Request) -> None:
    """An httpx request hook: the current context goes out with every request of the client."""
    inject_into(request.headers)
