"""The admin audit log, for pharmacists and admins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import KeyFirstRoute, PharmacistActor, SessionDep
from app.orm import Role
from app.schemas.audit import AuditEntryRead, AuditPage
from app.schemas.common import NO_CONTROL_PATTERN, IdQuery, problem_responses
from app.services.audit import list_entries

# Filters match stored values exactly (at most 64 characters, no control characters): anything else is a 422.
FilterText = Annotated[str | None, Query(max_length=64, pattern=NO_CONTROL_PATTERN)]

# Detail keys that hold paths on the server (model and dataset imports): for admins only.
SERVER_PATH_DETAILS = frozenset({"source", "path"})

router = APIRouter(route_class=KeyFirstRoute, tags=["audit"], responses=problem_responses(401, 403, 422))


@router.get("/v1/admin/audit-log", response_model=AuditPage)
def audit_log(actor: PharmacistActor, session: SessionDep,
              limit: Annotated[int, Query(ge=1, le=500)] = 50, before_id: IdQuery = None,
              action: FilterText = None, entity_type: FilterText = None, entity_id: FilterText = None) -> AuditPage:
    """Newest first; filter by action (e.g. `cost_matrix.create`), entity type or id.

    Where a change came from on the server's disks (`source` and `path` of a model or dataset import) is
    shown to admins only.
    """
    entries = list_entries(session, limit=limit, before_id=before_id, action=action, entity_type=entity_type,
                           entity_id=entity_id)
    next_before = entries[-1].id if len(entries) == limit else None
    items = [AuditEntryRead.model_validate(e) for e in entries]
    if not actor.role.includes(Role.ADMIN):
        for item in items:
            item.details = {key: value for key, value in item.details.items() if key not in SERVER_PATH_DETAILS}
    return AuditPage(items=items, next_before_id=next_before)
