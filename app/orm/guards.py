"""Session-level guards: immutable and append-only rows cannot be changed through the ORM."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from app.orm.audit import AdminAuditEntry
from app.orm.costs import CostMatrixEntry, CostMatrixVersion
from app.orm.registry import ModelPromotion

IMMUTABLE_TYPES: tuple[type, ...] = (CostMatrixVersion, CostMatrixEntry, AdminAuditEntry, ModelPromotion)


class ImmutableRowError(RuntimeError):
    """An update or delete of a row that is immutable by design was attempted."""


@event.listens_for(Session, "before_flush")
def _refuse_changes_to_immutable_rows(session: Session, _context: Any, _instances: Any) -> None:
    for obj in session.deleted:
        if isinstance(obj, IMMUTABLE_TYPES):
            raise ImmutableRowError(f"{type(obj).__name__} rows are immutable and cannot be deleted")
    for obj in session.dirty:
        if isinstance(obj, IMMUTABLE_TYPES) and session.is_modified(obj):
            raise ImmutableRowError(f"{type(obj).__name__} rows are immutable and cannot be updated")
