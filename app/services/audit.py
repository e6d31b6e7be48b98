"""The admin audit log: every administrative change records who, what, when and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.log import current_request_id
from app.orm import AdminAuditEntry, Role


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is acting: an API key's holder, or a command-line operator (key_id None)."""

    name: str
    role: Role
    key_id: int | None = None

    @classmethod
    def cli(cls, command: str) -> Actor:
        """The operator running an `rxverify` command on the server (trusted as admin)."""
        return cls(name=f"cli:{command}", role=Role.ADMIN)


def record_change(session: Session, *, actor: Actor, action: str, entity_type: str, entity_id: str | int,
                  reason: str | None = None, details: dict[str, Any] | None = None) -> AdminAuditEntry:
    """Append one audit entry in the caller's transaction (so it commits or rolls back with the change)."""
    entry = AdminAuditEntry(actor=actor.name, actor_key_id=actor.key_id, actor_role=actor.role.value,
                            action=action, entity_type=entity_type, entity_id=str(entity_id),
                            reason=reason, details=details or {}, request_id=current_request_id())
    session.add(entry)
    session.flush()
    return entry


def list_entries(session: Session, *, limit: int = 50, before_id: int | None = None, action: str | None = None,
                 entity_type: str | None = None, entity_id: str | None = None) -> list[AdminAuditEntry]:
    """Newest first, keyset-paginated by id."""
    query = select(AdminAuditEntry).order_by(AdminAuditEntry.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(AdminAuditEntry.id < before_id)
    if action:
        query = query.where(AdminAuditEntry.action == action)
    if entity_type:
        query = query.where(AdminAuditEntry.entity_type == entity_type)
    if entity_id:
        query = query.where(AdminAuditEntry.entity_id == entity_id)
    return list(session.scalars(query))
