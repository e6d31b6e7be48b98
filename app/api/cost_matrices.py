"""Cost-matrix versions: list, read (`active` alias), create from a parent, activate, CSV, diff."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy.orm import Session

from app.api.deps import KeyFirstRoute, PharmacistActor, SessionDep, SettingsDep
from app.api.paging import NEXT_LINK_RESPONSE, link_next_page
from app.errors import DomainError, FieldError, InvalidInput
from app.orm import CostMatrixVersion
from app.schemas.common import MAX_ID, NO_CONTROL_PATTERN, IdQuery, problem_responses
from app.schemas.cost_matrices import (
    ActivateRequest,
    CostDifferenceRead,
    CostEntry,
    CostMatrixActivated,
    CostMatrixCreate,
    CostMatrixDiff,
    CostMatrixRead,
    CostMatrixSummary,
    RestoreRequest,
)
from app.services import cost_matrices as service

router = APIRouter(route_class=KeyFirstRoute, prefix="/v1/admin/cost-matrices", tags=["cost matrices"],
                   responses=problem_responses(401, 403, 404, 422))
VersionPath = Annotated[str, "a version number or `active`"]
CSV_MEDIA_TYPES = ("text/csv", "text/plain", "application/csv", "application/octet-stream")


class UnsupportedMediaType(DomainError):
    """The body's content type is not one this route reads (415)."""

    status = 415
    default_slug = "unsupported-media-type"
    default_title = "Unsupported media type"


def parse_ref(text: str, *, field: str = "path.version") -> service.VersionRef:
    """`active` or a positive version number."""
    if text == "active":
        return "active"
    if text.isascii() and text.isdigit() and len(text) <= len(str(MAX_ID)) and 1 <= int(text) <= MAX_ID:
        return int(text)
    # The same problem type as a malformed id anywhere else (FastAPI's validation of `int` path parameters).
    raise InvalidInput(f"{text[:40]!r} is not a version number or 'active'", slug="validation-error",
                       title="Request validation failed", errors=[FieldError(field, "expected a version number or 'active'", "version_ref")])


def _summary(version: CostMatrixVersion, active_id: int | None, *, entry_count: int) -> CostMatrixSummary:
    return CostMatrixSummary(version=version.id, parent_version=version.parent_id, author=version.author,
                             reason=version.reason, created_at=version.created_at, active=version.id == active_id,
                             default_cost=version.default_cost, entry_count=entry_count,
                             entries_sha256=version.entries_sha256)


def _read(session: Session, version: CostMatrixVersion) -> CostMatrixRead:
    entries = [CostEntry(true_ndc=e.true_ndc, predicted_ndc=e.predicted_ndc, cost=e.cost) for e in version.entries]
    summary = _summary(version, service.active_version_id(session), entry_count=len(entries))
    return CostMatrixRead(**summary.model_dump(), entries=entries)


def _difference(d: service.CostDifference) -> CostDifferenceRead:
    return CostDifferenceRead(true_ndc=d.true_ndc, predicted_ndc=d.predicted_ndc, from_cost=d.from_cost,
                              to_cost=d.to_cost)


@router.get("", response_model=list[CostMatrixSummary], responses=NEXT_LINK_RESPONSE)
def list_versions(_actor: PharmacistActor, session: SessionDep, request: Request, response: Response,
                  limit: Annotated[int, Query(ge=1, le=200)] = 50, before_id: IdQuery = None) -> list[CostMatrixSummary]:
    """Versions, newest first, without their entries (read one version for those)."""
    versions = service.list_versions(session, limit=limit, before_id=before_id)
    link_next_page(request, response, [v.id for v, _ in versions], limit=limit)
    active_id = service.active_version_id(session)
    return [_summary(v, active_id, entry_count=count) for v, count in versions]


@router.post("", response_model=CostMatrixRead, status_code=201, responses=problem_responses(409))
def create_version(body: CostMatrixCreate, actor: PharmacistActor, session: SessionDep, settings: SettingsDep,
                   response: Response) -> CostMatrixRead:
    """Create a version from `parent_version` (which must be the newest) plus `changes`. It is not activated."""
    changes = [service.CostChange(c.true_ndc, c.predicted_ndc, c.cost) for c in body.changes]
    version = service.create_version(session, parent_version=body.parent_version, reason=body.reason,
                                     changes=changes, actor=actor, max_cost=settings.max_cost)
    response.headers["Location"] = f"{router.prefix}/{version.id}"
    return _read(session, version)


async def csv_body(request: Request) -> str:
    """The raw body as UTF-8 text; 415 unless it is sent as CSV (or plain text)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in CSV_MEDIA_TYPES:
        raise UnsupportedMediaType(f"send the CSV as text/csv, not {content_type or 'no content type'}")
    try:
        return (await request.body()).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput("the CSV is not UTF-8 text", errors=[FieldError("body", str(exc), "encoding")]) from exc


_CSV_REQUEST_BODY = {"requestBody": {"required": True, "content": {"text/csv": {"schema": {
    "type": "string", "example": "true_ndc,predicted_ndc,cost\n50111-0434,00591-0461,10\n"}}}}}


@router.post("/import", response_model=CostMatrixRead, status_code=201, responses=problem_responses(409, 415),
             openapi_extra=_CSV_REQUEST_BODY)
def import_csv(actor: PharmacistActor, session: SessionDep, settings: SettingsDep, response: Response,
               text: Annotated[str, Depends(csv_body)],
               reason: Annotated[str, Query(min_length=1, max_length=2000, pattern=NO_CONTROL_PATTERN)],
               parent_version: IdQuery = None) -> CostMatrixRead:
    """Create a version holding exactly the CSV's costs (unlisted pairs cost 1); same parent rule as POST."""
    if not reason.strip():  # as the JSON bodies do (their strings are stripped): an audit reason says something
        raise InvalidInput("reason is blank", slug="validation-error", title="Request validation failed",
                           errors=[FieldError("query.reason", "must hold more than white space", "blank")])
    version = service.import_csv(session, parent_version=parent_version, reason=reason.strip(), text=text,
                                 actor=actor, max_cost=settings.max_cost)
    response.headers["Location"] = f"{router.prefix}/{version.id}"
    return _read(session, version)


@router.get("/diff", response_model=CostMatrixDiff)
def diff(_actor: PharmacistActor, session: SessionDep, from_version: Annotated[str, Query(alias="from")],
         to_version: Annotated[str, Query(alias="to")]) -> CostMatrixDiff:
    """Pairs whose cost differs from version `from` to version `to` (either may be `active`)."""
    old = service.get_version(session, parse_ref(from_version, field="query.from"))
    new = service.get_version(session, parse_ref(to_version, field="query.to"))
    changes = [_difference(d) for d in service.diff_versions(session, old.id, new.id)]
    return CostMatrixDiff(from_version=old.id, to_version=new.id, changes=changes)


@router.get("/{version}", response_model=CostMatrixRead)
def get_version(version: VersionPath, _actor: PharmacistActor, session: SessionDep) -> CostMatrixRead:
    """One version with its entries; `active` is the active one."""
    return _read(session, service.get_version(session, parse_ref(version)))


@router.get("/{version}/csv", response_class=Response,
            responses={200: {"content": {"text/csv": {}}, "description": "true_ndc,predicted_ndc,cost"}})
def export_csv(version: VersionPath, _actor: PharmacistActor, session: SessionDep) -> Response:
    """The version's non-default pairs as CSV (`true_ndc,predicted_ndc,cost`; unlisted pairs cost 1)."""
    found = service.get_version(session, parse_ref(version))
    return Response(service.export_csv(session, found.id), media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="cost-matrix-v{found.id}.csv"'})


@router.post("/{version}/activate", response_model=CostMatrixActivated, responses=problem_responses(409))
def activate(version: VersionPath, actor: PharmacistActor, session: SessionDep,
             body: ActivateRequest | None = None) -> CostMatrixActivated:
    """Make this version the one verifications and new training jobs use (an older one: a rollback).

    The answer lists every pair whose cost changed against the version replaced (also in the audit log).
    Send `expected_active` to refuse (409) if someone else activated another version since you looked.
    """
    done = service.activate_version(session, ref=parse_ref(version), actor=actor,
                                    reason=body.reason if body else None,
                                    expected_active=body.expected_active if body else None)
    return CostMatrixActivated(**_read(session, done.version).model_dump(), previous_active=done.previous,
                               changes=[_difference(d) for d in done.changes])


@router.post("/{version}/restore", response_model=CostMatrixRead, status_code=201, responses=problem_responses(409))
def restore(version: VersionPath, body: RestoreRequest, actor: PharmacistActor, session: SessionDep,
            response: Response) -> CostMatrixRead:
    """Create a new newest version holding exactly this version's costs (not activated).

    After a rollback by activating an older version, edits still build on the newest version; restore the
    older one first so that they build on its costs.
    """
    created = service.restore_version(session, ref=parse_ref(version), parent_version=body.parent_version,
                                      reason=body.reason, actor=actor)
    response.headers["Location"] = f"{router.prefix}/{created.id}"
    return _read(session, created)
