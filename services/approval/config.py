"""Approval's own settings (``STEWARD_APPROVAL_*``): the SLA and when pending requests expire."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ApprovalConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEWARD_APPROVAL_", extra="ignore")

    # Reviewers should decide within this many days (the SLA clock shown in the queue).
    sla_days: float = Field(default=5.0, gt=0, le=365)
    # Per-kind overrides, e.g. STEWARD_APPROVAL_SLA_DAYS_BY_KIND='{"access": 1}'.
    sla_days_by_kind: dict[str, float] = {}
    # A request still pending this many days after its due date expires.
    expire_after_days: float = Field(default=30.0, gt=0, le=3650)
    expiry_poll_seconds: float = Field(default=60.0, gt=0)
    # How often the audit chain's head is signed and written outside the database: records
    # newer than the last checkpoint are what a database-only attacker could still cut.
    checkpoint_seconds: float = Field(default=10.0, gt=0)

    def sla_for(self, kind: str) -> float:
        return self.sla_days_by_kind.get(kind, self.sla_days)
