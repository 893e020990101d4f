"""The CloudEvents 1.0 JSON envelope every event travels in."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from libs.common.db import new_id, utcnow

_REGISTRY: dict[str, type[EventPayload]] = {}


class EventPayload(BaseModel):
    """An event's ``data``. Subclasses name their subject; ``type`` carries the schema version."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    subject: ClassVar[str] = ""
    schema_version: ClassVar[int] = 1

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if cls.subject:
            if cls.subject in _REGISTRY and _REGISTRY[cls.subject] is not cls:
                raise TypeError(f"two payload models for subject {cls.subject}")
            _REGISTRY[cls.subject] = cls


def payload_model(subject: str) -> type[EventPayload]:
    """The payload model registered for a (relative) subject."""
    return _REGISTRY[subject]


class CloudEvent(BaseModel):
    """CloudEvents 1.0 structured JSON, plus the W3C ``traceparent`` extension."""

    model_config = ConfigDict(extra="allow")

    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str
    type: str
    subject: str | None = None
    time: datetime
    datacontenttype: Literal["application/json"] = "application/json"
    traceparent: str | None = None
    data: dict[str, Any]

    @classmethod
    def wrap(
        cls,
        payload: EventPayload,
        *,
        source: str,
        entity: str | None = None,
        traceparent: str | None = None,
    ) -> CloudEvent:
        return cls(
            id=new_id(),
            source=f"/steward/{source}",
            type=f"dev.steward.{payload.subject}.v{payload.schema_version}",
            subject=entity,
            time=utcnow(),
            traceparent=traceparent,
            data=payload.model_dump(mode="json"),
        )

    @property
    def relative_subject(self) -> str:
        """``dev.steward.authz.key.created.v1`` → ``authz.key.created``."""
        return self.type.removeprefix("dev.steward.").rsplit(".v", 1)[0]

    def payload(self) -> EventPayload:
        return payload_model(self.relative_subject).model_validate(self.data)
