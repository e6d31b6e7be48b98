"""The verification audit log: list and read records, record resolutions, list labelled feedback images."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from app.errors import FieldError, InvalidInput, NotFound
from app.ndc import NdcError, resolve_ndc
from app.orm import Resolution, Verification, utcnow
from app.schemas.common import has_control_characters
from app.services.audit import Actor, record_change
from app.services.products import catalog_keys, ndc_field_error


@dataclass(frozen=True, slots=True)
class LogFilter:
    """Filters of GET /v1/verifications (all optional; NDCs in any form)."""

    created_from: datetime | None = None
    created_before: datetime | None = None
    verdict: str | None = None
    ndc: str | None = None
    predicted_ndc: str | None = None
    model_version: int | None = None


class FeedbackExample(NamedTuple):
    """A retained photo with what a pharmacist found in the bottle: a labelled training example."""

    image_path: Path
    ndc: str
    verification_id: str
    resolved_at: datetime


def encode_cursor(row: Verification) -> str:
    """An opaque keyset cursor: the position after `row` in (created_at, id) descending order."""
    return base64.urlsafe_b64encode(f"{row.created_at.isoformat()}|{row.id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, row_id = text.split("|", 1)
        when = datetime.fromisoformat(created)
        if when.tzinfo is None or has_control_characters(row_id):
            raise ValueError("not a cursor this service wrote")
        return when.astimezone(UTC), row_id
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput("cursor: not a cursor from a `next` link", slug="validation-error",
                           errors=[FieldError("query.cursor", "invalid cursor", "invalid_cursor")]) from None


def _product_key(session: Session, text: str, field: str) -> str:
    try:
        return resolve_ndc(text, catalog_keys(session)).product_key
    except NdcError as exc:
        raise InvalidInput(f"{field}: {exc}", slug=exc.slug, errors=[ndc_field_error(exc, field)]) from exc


def list_verifications(session: Session, *, filters: LogFilter, limit: int,
                       cursor: str | None = None) -> tuple[list[Verification], str | None]:
    """Newest first, keyset-paginated on (created_at, id); returns the page and the next cursor."""
    query = select(Verification)
    if filters.created_from is not None:
        query = query.where(Verification.created_at >= filters.created_from)
    if filters.created_before is not None:
        query = query.where(Verification.created_at < filters.created_before)
    if filters.verdict is not None:
        query = query.where(Verification.verdict == filters.verdict)
    if filters.ndc is not None:
        query = query.where(Verification.prescribed_ndc == _product_key(session, filters.ndc, "query.ndc"))
    if filters.predicted_ndc is not None:
        key = _product_key(session, filters.predicted_ndc, "query.predicted_ndc")
        query = query.where(Verification.predicted_ndc == key)
    if filters.model_version is not None:
        query = query.where(Verification.model_version_id == filters.model_version)
    if cursor:
        created, row_id = _decode_cursor(cursor)
        query = query.where(or_(Verification.created_at < created,
                                and_(Verification.created_at == created, Verification.id < row_id)))
    rows = list(session.scalars(query.order_by(Verification.created_at.desc(), Verification.id.desc())
                                .limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def get_verification(session: Session, verification_id: str) -> Verification:
    """One record by id (404 `verification-not-found`); ids are UUIDs, so letter case does not matter."""
    row = session.get(Verification, verification_id.lower())
    if row is None:
        raise NotFound(f"verification {verification_id} does not exist", slug="verification-not-found")
    return row


def latest_resolutions(session: Session, verification_ids: Sequence[str]) -> dict[str, Resolution]:
    """The newest resolution of each verification that has one."""
    if not verification_ids:
        return {}
    rows = session.scalars(select(Resolution).where(Resolution.verification_id.in_(list(verification_ids)))
                           .order_by(Resolution.id))
    return {row.verification_id: row for row in rows}  # ascending ids: the newest one wins


def add_resolution(session: Session, *, verification_id: str, actual_ndc: str | None, checked_by: str | None,
                   note: str | None, actor: Actor) -> tuple[Resolution, Verification]:
    """Record what was really in the bottle (append-only: a later resolution supersedes an earlier one).

    A resolution labels a training example, so it is also an administrative change: the admin audit log
    gets a `verification.resolve` entry, naming the resolution it supersedes, in the same transaction.
    """
    row = get_verification(session, verification_id)
    key = _product_key(session, actual_ndc, "actual_ndc") if actual_ndc is not None else None
    if key is None and not (note and note.strip()):
        raise InvalidInput("a resolution without a catalog product needs a note saying what was in the bottle",
                           errors=[FieldError("note", "required when actual_ndc is null", "missing")])
    previous = latest_resolutions(session, [row.id]).get(row.id)
    resolution = Resolution(verification_id=row.id, actual_ndc=key, resolved_by=checked_by or actor.name,
                            resolved_by_key_id=actor.key_id, note=note, created_at=utcnow())
    session.add(resolution)
    session.flush()
    record_change(session, actor=actor, action="verification.resolve", entity_type="verification", entity_id=row.id,
                  reason=note, details={
                      "resolution_id": resolution.id, "actual_ndc": key, "prescribed_ndc": row.prescribed_ndc,
                      "checked_by": resolution.resolved_by, "labelled_example": key is not None and row.image_path is not None,
                      "supersedes": None if previous is None else {"resolution_id": previous.id,
                                                                   "actual_ndc": previous.actual_ndc}})
    return resolution, row


def feedback_examples(session: Session) -> list[FeedbackExample]:
    """Retained images whose newest resolution names a catalog product, oldest first (issue 5 trains on them)."""
    newest = (select(Resolution.verification_id, func.max(Resolution.id).label("resolution_id"))
              .group_by(Resolution.verification_id).subquery())
    query = (select(Verification.id, Verification.image_path, Resolution.actual_ndc, Resolution.created_at)
             .join(newest, newest.c.verification_id == Verification.id)
             .join(Resolution, Resolution.id == newest.c.resolution_id)
             .where(Verification.image_path.is_not(None), Resolution.actual_ndc.is_not(None))
             .order_by(Resolution.id))
    return [FeedbackExample(Path(path), ndc, verification_id, resolved_at)
            for verification_id, path, ndc, resolved_at in session.execute(query)
            if path is not None and ndc is not None]
