"""Auto-approve policies: declarative rules that decide low-risk requests without a reviewer.

A policy names one request kind and narrows it with conditions; every condition set must hold.
``asset`` requests are never auto-approved: admitting a model or MCP server to the catalog
always takes a person reading its validation checklist.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from libs.common.events.approval import AccessPayload, EndpointPayload, QuotaPayload
from libs.common.names import ProjectName

Tag = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]


class Rule(BaseModel):
    """The body of ``PUT /v1/policies/{name}``."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field(default="", max_length=500)
    kind: Literal["access", "endpoint", "quota"]
    enabled: bool = True
    projects: list[ProjectName] | None = Field(
        default=None, description="Only these projects (any project when absent)"
    )
    asset_kinds: list[Literal["model", "mcp_server"]] | None = Field(
        default=None, description="access: only assets of these kinds"
    )
    tags_any: list[Tag] | None = Field(
        default=None, description="access: the asset carries at least one of these tags"
    )
    max_estimated_cost: float | None = Field(
        default=None, ge=0, description="endpoint: the plan's estimated cost is at most this"
    )
    max_token_limit: int | None = Field(
        default=None, gt=0, description="quota: the requested limit is at most this"
    )
    require_good_standing: bool = Field(
        default=True,
        description="The project had no request rejected in the last lookback_days",
    )
    lookback_days: int = Field(default=30, ge=1, le=365)

    @model_validator(mode="after")
    def _conditions_fit_kind(self) -> Rule:
        only = {
            "asset_kinds": "access",
            "tags_any": "access",
            "max_estimated_cost": "endpoint",
            "max_token_limit": "quota",
        }
        for name, kind in only.items():
            if getattr(self, name) is not None and self.kind != kind:
                raise ValueError(f"{name} applies to {kind} requests only")
        narrowing = ("projects", "asset_kinds", "tags_any", "max_estimated_cost", "max_token_limit")
        if all(getattr(self, n) is None for n in narrowing):
            raise ValueError(
                f"a policy needs at least one condition ({', '.join(narrowing)}): "
                "one that approves every request of a kind is not a policy"
            )
        return self


def matches(rule: Rule, kind: str, project: str, payload: dict[str, Any]) -> bool:
    """Does the rule cover this request? (Good standing is checked by the caller.)"""
    if not rule.enabled or rule.kind != kind:
        return False
    if rule.projects is not None and project not in rule.projects:
        return False
    if kind == "access":
        access = AccessPayload.model_validate(payload)
        if rule.asset_kinds is not None and access.asset_kind not in rule.asset_kinds:
            return False
        wanted = {t.lower() for t in rule.tags_any or ()}
        if rule.tags_any is not None and not wanted & {t.lower() for t in access.tags}:
            return False
    if kind == "endpoint" and rule.max_estimated_cost is not None:
        plan = EndpointPayload.model_validate(payload).plan
        if plan.estimated_cost > rule.max_estimated_cost:
            return False
    if kind == "quota" and rule.max_token_limit is not None:
        return QuotaPayload.model_validate(payload).token_limit <= rule.max_token_limit
    return True
