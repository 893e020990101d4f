"""Spreading a model's calls over its replicas: least outstanding requests, ejection, failover.

A route with several upstreams (an endpoint's replicas the gateway balances, DESIGN §6) sends
each call to the healthy replica with the fewest calls in flight (ties go round-robin). A
replica that refuses a connection is ejected at once; one that answers with server errors
``EJECT_AFTER`` times in a row is ejected too; an ejected replica gets calls again after
``eject_seconds`` (if it still fails, it is ejected again). When every replica is ejected the
least recently ejected one is tried: refusing every call would be worse than trying.

State is per gateway process, keyed by upstream URL, and never blocks: a pick is a few dict
reads on the event loop.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

# Server errors in a row that eject a replica (a connect error ejects at once).
EJECT_AFTER = 3
# Upstreams whose state is kept before idle ones are forgotten.
MAX_TRACKED = 10_000


@dataclass
class _Upstream:
    outstanding: int = 0
    failures: int = 0  # server errors in a row
    ejected_until: float = 0.0


class Balancer:
    def __init__(
        self, *, eject_seconds: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.eject_seconds = eject_seconds
        self.clock = clock
        self._state: dict[str, _Upstream] = {}
        self._turn = itertools.count()

    def _of(self, upstream: str) -> _Upstream:
        state = self._state.get(upstream)
        if state is None:
            if len(self._state) >= MAX_TRACKED:  # replicas come and go: forget the idle ones
                now = self.clock()
                for idle in [
                    u
                    for u, st in self._state.items()
                    if not st.outstanding and st.ejected_until <= now
                ]:
                    del self._state[idle]
            state = self._state[upstream] = _Upstream()
        return state

    def pick(self, upstreams: Sequence[str], tried: Collection[str] = ()) -> str | None:
        """The upstream for the next attempt, or None when every one was tried."""
        left = [u for u in upstreams if u not in tried]
        if not left:
            return None
        if len(left) == 1:
            return left[0]
        now = self.clock()
        healthy = [u for u in left if self._of(u).ejected_until <= now]
        if not healthy:
            return min(left, key=lambda u: self._of(u).ejected_until)
        fewest = min(self._of(u).outstanding for u in healthy)
        candidates = [u for u in healthy if self._of(u).outstanding == fewest]
        return candidates[next(self._turn) % len(candidates)]

    def begin(self, upstream: str) -> None:
        self._of(upstream).outstanding += 1

    def end(self, upstream: str, *, connect_failed: bool = False, status: int = 0) -> None:
        """The attempt is over: a refused connection ejects; a 5xx counts toward ejection; any
        other answer clears the count."""
        state = self._of(upstream)
        state.outstanding = max(0, state.outstanding - 1)
        if connect_failed:
            state.failures = 0
            state.ejected_until = self.clock() + self.eject_seconds
        elif status >= 500 or status == 0:
            state.failures += 1
            if state.failures >= EJECT_AFTER:
                state.failures = 0
                state.ejected_until = self.clock() + self.eject_seconds
        else:
            state.failures = 0

    def ejected(self, upstream: str) -> bool:
        return self._of(upstream).ejected_until > self.clock()
