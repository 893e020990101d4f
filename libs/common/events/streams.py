"""JetStream streams and which subjects each holds (relative to the namespace)."""

from __future__ import annotations

# Control-plane events, one subject tree per service; usage has its own stream because its
# volume and retention differ by orders of magnitude.
STREAMS: dict[str, list[str]] = {
    "EVENTS": [
        "audit.>",
        "authz.>",
        "catalog.>",
        "approval.>",
        "inference.>",
        "metering.>",
        "gateway.keys.>",
    ],
    "USAGE": ["gateway.usage.>"],
}


def stream_for(subject: str) -> str:
    root = subject.split(".", 1)[0]
    if subject.startswith("gateway.usage."):
        return "USAGE"
    if subject.startswith("gateway.keys."):
        return "EVENTS"
    if f"{root}.>" in STREAMS["EVENTS"]:
        return "EVENTS"
    raise ValueError(f"no stream holds subject {subject}")
