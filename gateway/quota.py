"""Where token quotas plug in (DESIGN §7); enforced from local counters, never a network call.

The metering issue supplies the real implementation: counters per project (and key) per window,
synchronised through events. Until then every call is allowed, through the same two calls the
proxy will keep making: ``reserve`` before the upstream call, ``settle`` with the true count after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Reservation:
    """What was set aside for one call; ``allowed`` False means answer 429."""

    allowed: bool
    project: str
    credential_id: str
    model: str
    tokens: int = 0
    reason: str = ""
    retry_after_seconds: int | None = None
    # Soft-limit warning to pass on to the client (``x-steward-quota-warning``), if any.
    warning: str | None = None


class QuotaGate(Protocol):
    def reserve(
        self, *, project: str, credential_id: str, model: str, estimated_tokens: int
    ) -> Reservation: ...

    def settle(self, reservation: Reservation, *, used_tokens: int) -> None: ...


class AllowAll:
    """No quotas configured: every call is allowed, nothing is counted."""

    def reserve(
        self, *, project: str, credential_id: str, model: str, estimated_tokens: int
    ) -> Reservation:
        return Reservation(
            allowed=True,
            project=project,
            credential_id=credential_id,
            model=model,
            tokens=estimated_tokens,
        )

    def settle(self, reservation: Reservation, *, used_tokens: int) -> None:
        return None
