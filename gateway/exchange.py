"""One model call, from admission to its usage event.

An ``Exchange`` owns what the call's accounting needs: the parsed request, its one prompt
estimate (what the quota reserves), how far the response got, how its tokens are counted (the
upstream's usage if believable, else the model's tokenizer or the estimate), and the finaliser.
It is a context manager: leaving the block settles the quota hold and records the usage event
together, whichever way the call ended (an answer, a refusal, an upstream failure, the client
gone, a cancellation), so neither can be skipped or done twice.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

from gateway.admission import Admission, Refusal
from gateway.calls import Call, finish
from gateway.journal import Journal
from gateway.quota import Reservation
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
from gateway.usage import UsageRecorder


class Exchange:
    __slots__ = (
        "_counted",
        "admission",
        "answered",
        "call",
        "complete",
        "counter",
        "estimate",
        "limits",
        "relay",
        "request",
        "reservation",
        "started",
        "traced",
        "usage",
    )

    def __init__(
        self,
        call: Call,
        request: dict[str, Any],
        *,
        body_bytes: int,
        cap: int,
        counter: TokenCounter,
        admission: Admission,
        usage: UsageRecorder,
        traced: bool,
    ) -> None:
        self.call = call
        self.request = request
        self.estimate = estimate_prompt(request)
        self.limits = UsageLimits.of(request, body_bytes, cap)
        self.counter = counter
        self.admission = admission
        self.usage = usage
        self.traced = traced
        self.reservation: Reservation | None = None
        self.relay: StreamRelay | None = None
        # How far the response got: headers sent (no error status possible any more), [DONE]
        # sent (the client has the whole answer), all sent.
        self.started = False
        self.answered = False
        self.complete = False
        self._counted: int | None = None

    def __enter__(self) -> Exchange:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        call = self.call
        if isinstance(exc, Refusal):
            call.fail(exc.status, exc.reason)
        try:
            if self.reservation is not None:
                self.admission.quota.settle(
                    self.reservation,
                    input_tokens=call.prompt_tokens,
                    output_tokens=call.completion_tokens,
                )
        finally:
            finish(call, self.usage, traced=self.traced)

    def reserve(self, max_tokens: int) -> Reservation:
        """Hold the prompt estimate and ``max_tokens`` against the quotas (429 if they won't);
        released by the finaliser."""
        call = self.call
        self.reservation = self.admission.reserve(
            project=call.project,
            credential_id=call.credential_id,
            model=call.model,
            input_tokens=self.estimate,
            output_tokens=max_tokens,
        )
        call.admitted = True
        return self.reservation

    def begin(self, journal: Journal | None) -> None:
        """The call goes upstream: remembered in the in-flight journal until its event is safe."""
        if journal is not None:
            journal.begin(self.call.interrupted(self.estimate))

    def stream_relay(self, *, strip_usage: bool) -> StreamRelay:
        self.relay = StreamRelay(
            strip_usage=strip_usage, keep_text=isinstance(self.counter, ModelTokenizer)
        )
        return self.relay

    def streamed_estimate(self) -> int:
        """Tokens streamed so far, cheaply (the journal's checkpoints)."""
        return estimate_chars(self.relay.chars) if self.relay is not None else 0

    # -- counting -------------------------------------------------------------------------

    def prompt(self) -> int:
        """The prompt's tokens by the model's counter (once; the estimate is already known)."""
        if self.counter is ESTIMATE:
            return self.estimate
        if self._counted is None:
            self._counted = self.counter.prompt(self.request)
        return self._counted

    def account(self, status: int, payload: bytes) -> None:
        """Tokens of a non-streamed answer: the upstream's usage if believable, else counted."""
        call = self.call
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
        reported = reported_usage(usage, self.limits)
        if isinstance(reported, tuple):
            call.prompt_tokens, call.completion_tokens = reported
            return
        call.usage_source = "corrected" if reported == "implausible" else self.counter.source
        call.prompt_tokens = self.prompt()
        if isinstance(response, dict) and call.kind != "embedding":
            call.completion_tokens = self.counter.text(completion_text(response))

    def stream_ended(self) -> None:
        """A stream relayed to its end: its usage, and whether the upstream finished it."""
        relay = self.relay
        assert relay is not None
        self.complete = True
        self._stream_usage()
        call = self.call
        if relay.upstream_error is not None:
            call.status = "error"
            call.error_type = str(relay.upstream_error.get("type") or "upstream_error")
        elif not relay.done:
            call.status = "error"
            call.error_type = "upstream_incomplete"

    def client_left(self) -> None:
        """The client left. After ``[DONE]`` it had the whole answer (it hung up before the
        upstream's last bytes): the call is complete, with the usage it carried. Before, the
        call was cancelled and its tokens are counted from what was relayed."""
        if self.complete:
            return
        call = self.call
        if self.answered:
            self.complete = True
            self._stream_usage()
            return
        call.status = "cancelled"
        call.error_type = "client_disconnected"
        call.http_status = call.http_status or 499
        self.cut()

    def cut(self) -> None:
        """A response that did not finish: count what was relayed (the upstream's usage, if
        any came, does not cover what the client never got)."""
        call = self.call
        if self.relay is not None and not self.complete:
            self._stream_usage()
            if call.usage_source == "upstream":
                call.usage_source = self.counter.source
        elif self.relay is None:
            call.prompt_tokens = self.prompt()
            call.usage_source = self.counter.source

    def _stream_usage(self) -> None:
        relay = self.relay
        assert relay is not None
        call = self.call
        reported = reported_usage(relay.usage, self.limits)
        if isinstance(reported, tuple) and relay.done:
            call.prompt_tokens, call.completion_tokens = reported
            call.usage_source = "upstream"
            return
        call.usage_source = "corrected" if reported == "implausible" else self.counter.source
        call.prompt_tokens = reported[0] if isinstance(reported, tuple) else self.prompt()
        call.completion_tokens = self.counter.streamed(relay)
