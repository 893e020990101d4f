"""Steward's token quota and metering plugin for real Kong, as a Kong Python PDK plugin.

What ``steward gateway export --format kong`` puts on every model route: before the call, refuse
it (429) when the project's token budget for the minute or the day is spent; after it, count the
tokens (the upstream's ``usage``, else an estimate marked as such) and send a ``usage.recorded``
payload to Steward (``usage_url``: the gateway admin's ``POST /steward/usage``, with the platform
key from ``STEWARD_USAGE_API_KEY``), from a background thread so no call waits on it.

Run by Kong's plugin server (kong.conf; the server listens on ``<prefix>/steward-quota.sock``
and a dedicated server dumps its info with ``--dump``)::

    pluginserver_names = steward_quota
    pluginserver_steward_quota_socket = /usr/local/kong/steward-quota.sock
    pluginserver_steward_quota_start_cmd = python3 -m gateway.kong.steward_quota -p /usr/local/kong
    pluginserver_steward_quota_query_cmd = python3 -m gateway.kong.steward_quota --dump
    plugins = bundled,steward-quota

The counting and parsing below are plain functions (tested with the gateway); only ``Plugin``
touches the PDK, which is imported when Kong runs the plugin, never by the gateway itself.
tests/gateway/test_kong_plugin_server.py runs it under the real plugin server.
"""

from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

version = "0.1.0"
priority = 900  # after authentication (key-auth 1250) and acl (950), like rate-limiting (910)

Schema = (
    {"project": {"type": "string"}},
    {"tokens_per_minute": {"type": "integer"}},
    {"tokens_per_day": {"type": "integer"}},
    {"usage_url": {"type": "string"}},
    {"estimate_when_missing": {"type": "boolean", "default": True}},
)

WINDOWS = {"minute": 60, "day": 86400}


class TokenBudget:
    """Tokens used per project in fixed windows, in the plugin server's memory."""

    def __init__(self) -> None:
        self._used: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def remaining(
        self, project: str, limits: dict[str, int | None], now: float
    ) -> tuple[bool, int]:
        """(allowed, seconds until the exhausted window resets)."""
        spent = self.exhausted(project, limits, now)
        return (True, 0) if spent is None else (False, spent[1])

    def exhausted(
        self, project: str, limits: dict[str, int | None], now: float
    ) -> tuple[int, int] | None:
        """(limit, whole seconds until it resets) of a spent window; None while all have room."""
        with self._lock:
            for window, size in WINDOWS.items():
                limit = limits.get(window)
                if not limit:
                    continue
                start, used = self._used.get((project, window), (now - now % size, 0))
                if start != now - now % size:
                    used = 0
                if used >= limit:
                    # Rounded up, as the gateway does: a client retrying then is not refused again.
                    return limit, max(1, math.ceil(start + size - now))
        return None

    def add(self, project: str, tokens: int, now: float) -> None:
        with self._lock:
            for window, size in WINDOWS.items():
                start = now - now % size
                old_start, used = self._used.get((project, window), (start, 0))
                self._used[(project, window)] = (
                    start,
                    (used if old_start == start else 0) + tokens,
                )


def usage_from_body(body: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a JSON answer or from the usage chunk of an SSE stream."""
    text = body.strip()
    candidates: list[bytes] = []
    if text.startswith(b"{"):
        candidates.append(text)
    else:
        candidates += [line[5:].strip() for line in text.splitlines() if line.startswith(b"data:")]
    for raw in reversed(candidates):
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict) and "prompt_tokens" in usage:
            prompt, completion = usage["prompt_tokens"], usage.get("completion_tokens", 0)
            if _believable(prompt) and _believable(completion):
                return prompt, completion
            return None  # counts no call could have used: estimate instead
    return None


# No one call uses more; an upstream saying so is not believed (it would bill for nothing).
MAX_CALL_TOKENS = 10_000_000


def _believable(count: object) -> bool:
    return type(count) is int and 0 <= count <= MAX_CALL_TOKENS


def estimate_completion(body: bytes) -> int:
    """About four characters per token of generated text, as the gateway estimates."""
    chars = 0
    for line in body.splitlines():
        raw = line[5:].strip() if line.startswith(b"data:") else line.strip()
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        for choice in data.get("choices") or [] if isinstance(data, dict) else []:
            delta = choice.get("delta") or choice.get("message") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            text = content if isinstance(content, str) else choice.get("text")
            if isinstance(text, str):
                chars += len(text)
    return -(-chars // 4)


def usage_payload(
    *,
    project: str,
    credential_id: str,
    model: str,
    prompt: int,
    completion: int,
    estimated: bool,
    status: int,
    duration_ms: float,
) -> dict[str, Any]:
    """The ``usage.recorded`` payload (libs/common/events/usage.py) for one call through Kong."""
    return {
        "event_id": str(uuid.uuid4()),
        "time": datetime.now(UTC).isoformat(),
        "project": project,
        "credential_id": credential_id,
        "subject_id": credential_id,
        "model": model,
        "endpoint": model,
        "kind": "chat",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "ttft_ms": None,
        "duration_ms": round(duration_ms, 3),
        "http_status": status,
        "status": "ok" if status < 400 else "error",
        "error_type": None if status < 400 else f"upstream_{status}",
        "usage_source": "estimated" if estimated else "upstream",
        "stream": False,
    }


class _Sender(threading.Thread):
    """Posts usage payloads in the background; a failed post is retried a few times."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="steward-usage")
        self.queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(maxsize=100_000)

    def run(self) -> None:
        key = os.environ.get("STEWARD_USAGE_API_KEY", "")
        while True:
            url, payload = self.queue.get()
            try:
                self._post(url, payload, key)
            except Exception as error:
                # One route's bad usage_url (a port left as ${VAR}, say) must not stop usage for
                # every route. Kong logs what the plugin server prints.
                print(f"steward-quota: usage not sent to {url}: {error!r}", file=sys.stderr)

    @staticmethod
    def _post(url: str, payload: dict[str, Any], key: str) -> None:
        request = urllib.request.Request(  # noqa: S310 - an operator-configured http(s) URL
            url,
            data=json.dumps([payload]).encode(),
            method="POST",
            headers={"content-type": "application/json", "apikey": key},
        )
        for attempt in range(3):
            try:
                with urllib.request.urlopen(request, timeout=5):  # noqa: S310
                    return
            except OSError:
                time.sleep(0.5 * 2**attempt)
        raise OSError("3 attempts failed")


BUDGET = TokenBudget()
_SENDER: _Sender | None = None


def _sender() -> _Sender:
    global _SENDER
    if _SENDER is None:
        _SENDER = _Sender()
        _SENDER.start()
    return _SENDER


def _value(answer: Any) -> Any:
    """A PDK call's result. The plugin server answers Lua-style ``(data, err)`` by default (what
    the start_cmd above runs) and plain data with ``--no-lua-style``: take either."""
    if isinstance(answer, tuple):  # msgpack gives lists, so a tuple is the Lua-style pair
        data, err = answer
        if err:
            raise RuntimeError(f"PDK call failed: {err}")
        return data
    return answer


class Plugin:
    """The PDK entry point: Kong calls ``access`` before proxying and ``response`` after (a
    ``response`` phase makes Kong buffer the upstream answer, so its body can be counted)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def access(self, kong: Any) -> None:
        _guarded(kong, "access", self._access)

    def response(self, kong: Any) -> None:
        _guarded(kong, "response", self._response)

    def _project(self, kong: Any) -> str:
        if self.config.get("project"):
            return str(self.config["project"])
        consumer = _value(kong.client.get_consumer()) or {}
        return str(consumer.get("username") or consumer.get("custom_id") or "unknown")

    def _access(self, kong: Any) -> None:
        now = time.time()
        # A PDK call before any refusal: kong-pdk's server never forgets an event whose very
        # first message is kong.response.exit (only its Step drops terminal events).
        kong.ctx.shared.set("steward_started", now)
        limits = {
            "minute": self.config.get("tokens_per_minute"),
            "day": self.config.get("tokens_per_day"),
        }
        spent = BUDGET.exhausted(self._project(kong), limits, now)
        if spent is not None:
            limit, retry = spent
            headers = {
                "Retry-After": str(retry),
                "RateLimit-Limit": str(limit),
                "RateLimit-Remaining": "0",
                "RateLimit-Reset": str(retry),
            }
            kong.response.exit(429, {"message": "Token quota exceeded"}, headers)
            return
        kong.service.request.enable_buffering()

    def _response(self, kong: Any) -> None:
        body = _value(kong.service.response.get_raw_body()) or b""
        if isinstance(body, str):
            body = body.encode()
        counts = usage_from_body(body)
        estimated = counts is None
        prompt, completion = counts if counts is not None else (0, estimate_completion(body))
        project = self._project(kong)
        BUDGET.add(project, prompt + completion, time.time())
        url = self.config.get("usage_url")
        if url:
            started = _value(kong.ctx.shared.get("steward_started")) or time.time()
            credential = _value(kong.client.get_credential()) or {}
            service = _value(kong.router.get_service()) or {}
            status = _value(kong.service.response.get_status()) or 0
            _sender().queue.put_nowait(
                (
                    str(url),
                    usage_payload(
                        project=project,
                        credential_id=str(credential.get("id", "")),
                        model=str(service.get("name", "")),
                        prompt=prompt,
                        completion=completion,
                        estimated=estimated,
                        status=int(status),
                        duration_ms=(time.time() - float(started)) * 1000,
                    ),
                )
            )


def _guarded(kong: Any, phase: str, handler: Callable[[Any], None]) -> None:
    """Run a phase, logging what it raises: a phase that raises never answers the plugin
    server's event, and Kong's call then waits out its socket timeout."""
    try:
        handler(kong)
    except Exception as error:
        kong.log.err(f"steward-quota {phase}: {error!r}")


if __name__ == "__main__":
    from kong_pdk.cli import start_dedicated_server

    start_dedicated_server("steward-quota", Plugin, version, priority, Schema)
