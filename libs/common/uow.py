"""The unit of work handed to domain code: one transaction, its outbox, and who is acting.

Domain functions change rows, emit events and record audit entries through it; all of it
commits together or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.db import utcnow
from libs.common.events import CloudEvent, EventPayload
from libs.common.events.audit import AuditRecorded
from libs.common.observability import request_id_var
from libs.common.outbox import Outbox


@dataclass
class UnitOfWork:
    session: AsyncSession
    outbox: Outbox
    actor: str

    async def emit(self, payload: EventPayload, *, entity: str | None = None) -> CloudEvent:
        return await self.outbox.add(self.session, payload, entity=entity)

    async def audit(
        self,
        action: str,
        target: str,
        *,
        project: str | None = None,
        before: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
    ) -> None:
        """Record a state change for the tamper-evident audit log (stored by approval)."""
        await self.emit(
            AuditRecorded(
                service=self.outbox.source,
                actor=self.actor,
                action=action,
                target=target,
                project=project,
                before=before,
                after=after,
                request_id=request_id_var.get(),
                at=utcnow(),
            ),
            entity=target,
        )
