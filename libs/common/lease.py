"""Leadership among the replicas of a service: one of them runs a loop the others must not.

A PostgreSQL session advisory lock, held on a connection of the lease's own. The lock lives as
long as that connection: when the leader dies (a crash, ``kill -9``, a lost node) its server
session ends and the lock with it, and another replica takes it at its next ``hold()``. A
leader that cannot reach the database any more stops leading at once (it cannot know whether
another took over). SQLite is the embedded, one-process default: there, the one process leads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, PendingRollbackError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger("steward.lease")

# What a connection that broke raises (its lock is gone with it), or one left unusable by a
# statement cancelled half-way (PendingRollbackError: dropping it ends its session and lock).
_LOST = (
    DBAPIError,
    InterfaceError,
    OperationalError,
    PendingRollbackError,
    OSError,
    ConnectionError,
)


class Lease:
    def __init__(self, engine: AsyncEngine, name: str) -> None:
        self.engine = engine
        self.name = name
        # The advisory lock's key: 64 bits of the name's hash (one lock per name per database).
        self.key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        self.leading = False
        self._connection: AsyncConnection | None = None

    async def hold(self) -> bool:
        """Whether this replica leads now: it keeps the lock it has (checking its connection
        still lives), or takes it if no one holds it."""
        if self.engine.dialect.name != "postgresql":
            self.leading = True
            return True
        try:
            if self._connection is None:
                connection = await self.engine.connect()
                self._connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
            if self.leading:
                await self._connection.execute(text("SELECT 1"))
            else:
                taken = await self._connection.scalar(
                    text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}
                )
                if taken:
                    log.info("leading", extra={"lease": self.name})
                self.leading = bool(taken)
        except _LOST as exc:
            if self.leading:
                log.warning("lease lost", extra={"lease": self.name, "error": str(exc)[:200]})
            self.leading = False
            await self._drop()
        return self.leading

    async def release(self) -> None:
        """Step down (a clean stop): another replica may lead at once."""
        if self._connection is not None and self.leading:
            with contextlib.suppress(*_LOST):
                await self._connection.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": self.key}
                )
        self.leading = False
        await self._drop()

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await connection.close()
            except _LOST:
                # Its session is gone already, and the lock with it.
                await connection.invalidate()
