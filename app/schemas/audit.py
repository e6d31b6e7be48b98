"""Admin audit log schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from app.schemas.common import ReadModel


class AuditEntryRead(ReadModel):
    """One administrative change."""

    id: int
    created_at: datetime
    actor: str
    actor_key_id: int | None
    actor_role: str | None
    action: str
    entity_type: str
    entity_id: str
    reason: str | None
    details: dict[str, Any]
    request_id: str | None


class AuditPage(BaseModel):
    """Newest first; pass `next_before_id` as `before_id` for the next page."""

    items: list[AuditEntryRead]
    next_before_id: int | None
