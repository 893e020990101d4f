"""Price resolution: the one place that says what a catalog asset cost at a given moment.

A call and a GPU-hour are priced by the same rule (DESIGN §7): by the catalog asset and
version that served them, never by the route or endpoint name a client called, and with the
price in force at the time of the usage. ``PriceBook.at`` is that rule; the ingest prices token
usage with it and the endpoint follower prices GPU periods with it.

Resolution at time ``t`` for (asset, version):

1. the version's own price in force at ``t`` (the latest row with ``effective_from <= t``),
   unless that row withdrew it;
2. else the asset's price (version "") in force at ``t``, unless withdrawn;
3. else no price: tokens cost 0, GPU-hours fall back to the approved plan's rate.

A resolved price applies as a whole: a version price without a GPU-hour price does not borrow
the asset's GPU-hour price.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from datetime import datetime

from services.metering.models import Price

# ``Price.version`` of an asset's price for every version.
ANY_VERSION = ""


class PriceBook:
    """The price history of some assets, read once (a batch of usage, or one endpoint event)."""

    def __init__(self, rows: Iterable[Price]) -> None:
        self._history: dict[tuple[str, str], list[Price]] = {}
        for row in sorted(rows, key=lambda r: r.effective_from):
            self._history.setdefault((row.asset, row.version), []).append(row)
        self._starts = {
            key: [r.effective_from for r in rows] for key, rows in self._history.items()
        }

    def _in_force(self, asset: str, version: str, when: datetime) -> Price | None:
        starts = self._starts.get((asset, version))
        if not starts:
            return None
        i = bisect.bisect_right(starts, when)
        if i == 0:
            return None
        row = self._history[(asset, version)][i - 1]
        return None if row.withdrawn else row

    def at(self, asset: str, version: str | None, when: datetime) -> Price | None:
        """The price of ``asset`` (``version`` of it, if known) in force at ``when``."""
        if version:
            found = self._in_force(asset, version, when)
            if found is not None:
                return found
        return self._in_force(asset, ANY_VERSION, when)


def cost_nanos(price: Price | None, prompt_tokens: int, completion_tokens: int) -> int:
    """The cost of one call's tokens at ``price`` (0 without one), rounded to the nano-unit."""
    if price is None:
        return 0
    per_1k = (
        prompt_tokens * price.input_per_1k_nanos + completion_tokens * price.output_per_1k_nanos
    )
    return (per_1k + 500) // 1000


def gpu_hour_nanos(price: Price | None) -> int | None:
    """The GPU-hour price of a resolved price (None: the plan's rate applies)."""
    return None if price is None else price.gpu_hour_nanos
