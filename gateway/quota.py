"""Token quotas at the edge (DESIGN §7): decided from local counters, never a network call.

The gateway holds a ``QuotaLedger`` (libs/common/quota.py, shared with metering), loaded from
metering's ``GET /v1/quotas/snapshot`` and kept current by ``metering.quota.*`` events
(gateway/sync.py). A call reserves its estimate (prompt estimate + ``max_tokens``) before going
upstream and settles its real usage after; an empty ledger (no quotas) admits every call.
"""

from __future__ import annotations

from libs.common.quota import QuotaLedger, Reservation

__all__ = ["QuotaLedger", "Reservation", "client_headers"]


def client_headers(reservation: Reservation) -> list[tuple[bytes, bytes]]:
    """``RateLimit-*`` (and ``Retry-After`` on a refusal) and the soft-threshold warning."""
    headers = [(k.lower().encode(), v.encode()) for k, v in reservation.headers.items()]
    if reservation.warning:
        headers.append((b"x-steward-quota-warning", reservation.warning.encode()))
    return headers
