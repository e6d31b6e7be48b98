"""The admin audit log, for pharmacists and admins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import PharmacistActor, SessionDep
from app.schemas.audit import AuditEntryRead, AuditPage
from app.schemas.common import problem_responses
from app.services.audit import list_entries

router = APIRouter(tags=["audit"], responses=problem_responses(401, 403, 422))


@router.get("/v1/admin/audit-log", response_model=AuditPage)
def audit_log(_actor: PharmacistActor, session: SessionDep,
              limit: Annotated[int, Query(ge=1, le=500)] = 50, before_id: int | None = None,
              action: str | None = None, entity_type: str | None = None, entity_id: str | None = None) -> AuditPage:
    """Newest first; filter by action (e.g. `cost_matrix.create`), entity type or id."""
    entries = list_entries(session, limit=limit, before_id=before_id, action=action, entity_type=entity_type,
                           entity_id=entity_id)
    next_before = entries[-1].id if len(entries) == limit else None
    return AuditPage(items=[AuditEntryRead.model_validate(e) for e in entries], next_before_id=next_before)
