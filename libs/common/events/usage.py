"""The usage event the gateway emits once per call (DESIGN §7), consumed by metering.

The CloudEvent id is the event id: metering de-duplicates by it, and JetStream by the
``Nats-Msg-Id`` it is published with, so a re-sent event (after a spool replay) counts once.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import Field

from libs.common.events.envelope import EventPayload

# upstream: its own usage; it reported none, so the gateway counted: with the model's own
# tokenizer (named by its catalog version), else estimated; corrected: it reported counts no call
# could have used (negative, not integers, past the request's limits), replaced by the gateway's.
UsageSource = Literal["upstream", "tokenizer", "estimated", "corrected"]
# interrupted: the gateway stopped (crashed, was killed) while the call ran; metered at its next
# start with what it had streamed.
CallStatus = Literal["ok", "error", "cancelled", "interrupted"]


class UsageRecorded(EventPayload):
    """One call through the gateway: who, what, how many tokens, how fast, and how it ended."""

    subject: ClassVar[str] = "gateway.usage.recorded"

    event_id: str
    time: datetime
    project: str
    credential_id: str
    subject_id: str
    model: str
    # The route (model endpoint or MCP server) the call went to.
    endpoint: str
    # The catalog asset the route serves and the approved version that answered: what metering
    # prices the call by. Added later (additive, same schema version): None in events from older
    # gateways, which metering then prices by ``model``.
    asset: str | None = None
    asset_version: str | None = None
    kind: Literal["chat", "completion", "embedding", "mcp"] = "chat"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # Milliseconds from sending upstream to the first content delta; None when not streamed.
    ttft_ms: float | None = None
    duration_ms: float
    http_status: int
    status: CallStatus
    # An OpenAI-style error type (``upstream_error``, ``timeout``…) when status is not ok.
    error_type: str | None = None
    usage_source: UsageSource = "upstream"
    stream: bool = False
    # The gateway process that served the call (a new id at every start). Metering counts each
    # quota's usage per gateway too, so a gateway's ledger adds its own calls exactly once: its
    # local count, in place of metering's count of them. None from other sources (Kong).
    gateway_id: str | None = Field(default=None, max_length=64)
    # The call passed admission and held its quota: quotas count it as a call (their
    # ``requests`` limit). A call the gateway refused first (a quota, a bad parameter, a tool
    # outside the grant) is recorded, with no tokens, but is not a call against a quota.
    admitted: bool = True
    # Bytes of the call (MCP tool calls): its JSON-RPC message, and its share of the answer (a
    # batch's answer is divided among its calls, so sums are exact). None: not measured.
    request_bytes: int | None = Field(default=None, ge=0)
    response_bytes: int | None = Field(default=None, ge=0)
    # The model the client asked for, when a model of the project's fallback chain served the
    # call (``model``, ``asset`` and ``asset_version`` are then the fallback's).
    fallback_from: str | None = Field(default=None, max_length=255)
    # The call's ``X-Request-Id`` (the client's, or the one the gateway gave it in its answer):
    # a client's log line finds its usage row by it. None from older gateways.
    request_id: str | None = Field(default=None, max_length=64)


class KeysUsed(EventPayload):
    """The API keys a gateway let through in the last interval: authz keeps each key's
    ``last_used_at`` to the interval (gateways verify keys locally: authz sees no call)."""

    subject: ClassVar[str] = "gateway.keys.used"

    gateway_id: str = Field(max_length=64)
    at: datetime
    key_ids: list[str] = Field(max_length=100_000)
